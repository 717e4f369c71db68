"""The transfer tasks' layouts of the synthetic corpus (make_synthetic_data.py --layouts naming
keypoints, lvis, cityscapes), from the same scenes as its VOC and COCO layouts (suite.contract.Corpus):
- COCO person-keypoints format: one category, "shape", whose 4 keypoints are the extreme vertices of
  its outline (top, right, bottom, left; a horizontal flip swaps left and right); v=2 visible, v=1
  hidden under a shape in front, v=0 outside the image.
- LVIS v1 format: polygons of the visible part of each shape, frequencies r / c / f by rank of
  training image count (2 rarest classes r, next 3 c, rest f: LVIS's 10 / 100 image thresholds
  would make every class of a small corpus rare), and federated labels: neg_category_ids are a
  seeded half of the classes absent from an image; where a class has 2+ instances, with
  probability 0.3 one of them is left unannotated and the class listed in
  not_exhaustive_category_ids (so the file says what is true of it).
- Cityscapes: leftImg8bit/<split>/<city>/ PNGs and gtFine/<split>/<city>/ polygons.json (a "road"
  polygon over the whole frame, then each shape's outline, back to front: later polygons cover
  earlier ones, as Cityscapes draws them; the ground is road, not void, so that detections on it
  count as false positives), at twice the corpus's size (so every shape clears cityscapesscripts'
  100-pixel minimum region; Cityscapes' 2048 x 1024 images are also shrunk by its configs),
  with labelIds / instanceIds PNGs rasterised from them by cityscapesscripts' own
  json2labelImg / json2instanceImg. The 8 shape classes are the 8 Cityscapes instance classes in
  order (circle = person, ..., crescent = bicycle). Polygon formats hold no holes: a ring is a disc
  there, as COCO/LVIS/Cityscapes polygons are.
Polygon geometry: shapely; masks, areas and boxes: pycocotools; Cityscapes rasters: cityscapesscripts."""
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from suite import contract

KEYPOINTS = ("top", "right", "bottom", "left")
KEYPOINT_FLIP = (("left", "right"),)
SKELETON = [[1, 2], [2, 3], [3, 4], [4, 1]]
CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "lindau")}  # real city folder names
FRAME = 19  # Cityscapes' annotated frame of each sequence
CITYSCAPES_SCALE = 2
FREQUENCY_RANKS = (("r", 2), ("c", 3))  # the rest: "f"
NOT_EXHAUSTIVE_P = 0.3


def cityscapes_instance_classes():
    """The 8 Cityscapes instance classes, as Detectron2's loader and evaluator take them."""
    from cityscapesscripts.helpers.labels import labels

    return [lab.name for lab in labels if lab.hasInstances and not lab.ignoreInEval]


def shape_geometry(polygons):
    """A placed shape (fill and hole polygons, image coordinates) as one shapely geometry."""
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    fills, holes = polygons
    shape = unary_union([Polygon(p) for p in fills])
    return shape.difference(unary_union([Polygon(p) for p in holes])) if holes else shape


def outline_parts(geometry, min_area=1.0):
    """Flat [x0, y0, x1, y1, ...] exteriors of a geometry's polygon parts (holes dropped)."""
    parts = getattr(geometry, "geoms", [geometry])
    out = []
    for g in parts:
        if g.geom_type == "Polygon" and g.area >= min_area:
            out.append([round(float(v), 2) for xy in list(g.exterior.coords)[:-1] for v in xy])
    return out


def outline_vertices(geometry):
    """The vertices of a shape's outline (a crescent's: both arcs' ends; a ring's: the outer circle)."""
    parts = getattr(geometry, "geoms", [geometry])
    return np.concatenate([np.asarray(g.exterior.coords)[:-1] for g in parts if g.geom_type == "Polygon"])


def extreme_vertices(points):
    """Indices of the top, right, bottom and left vertices (image y points down; ties: the first)."""
    x, y = points[:, 0], points[:, 1]
    return int(np.argmin(y)), int(np.argmax(x)), int(np.argmax(y)), int(np.argmin(x))


class TaskLayouts:
    """Collects each image of the corpus and writes `layouts` (of keypoints, lvis, cityscapes);
    `finish()` writes the json files and returns what corpus.json records about them."""

    def __init__(self, root, classes, seed, layouts=("keypoints", "lvis", "cityscapes")):
        self.corpus, self.classes, self.layouts = contract.Corpus(root), list(classes), set(layouts)
        self.rng = np.random.default_rng([seed, 18])  # its own stream: the other layouts are unchanged
        self.cityscapes = (dict(zip(self.classes, cityscapes_instance_classes()))
                           if "cityscapes" in self.layouts else {})
        self.images = {}       # split -> [image record (its "lvis": federated labels)]
        self.keypoints = {}    # split -> [annotation]
        self.lvis = {}         # split -> [annotation]
        self.count = {"kp": 0, "lvis": 0}

    def add(self, split, image_id, name, image, size, instances):
        record = {"id": image_id, "file_name": f"{name}.jpg", "width": size, "height": size}
        self.images.setdefault(split, []).append(record)
        if "cityscapes" in self.layouts:
            self._cityscapes(split, image_id, image, size, instances)
        if {"keypoints", "lvis"} & self.layouts:
            self._coco_like(split, record, size, instances)

    def _coco_like(self, split, record, size, instances):
        from shapely.geometry import Point, box
        from shapely.ops import unary_union

        geoms = [shape_geometry(inst["polygons"]) for inst in instances]
        frame, image_id = box(0, 0, size, size), record["id"]
        kps, lvis = [], []
        for j, inst in enumerate(instances):
            front = unary_union(geoms[j + 1:]) if j + 1 < len(instances) else None
            visible = geoms[j].intersection(frame)
            visible = visible.difference(front) if front is not None else visible
            kps.append(self._keypoint_annotation(image_id, inst, geoms[j], front, size, Point))
            polys = outline_parts(visible)
            if polys:
                lvis.append(self._lvis_annotation(image_id, inst["category"] + 1, polys, size))
        self.keypoints.setdefault(split, []).extend(kps)
        self.lvis.setdefault(split, []).extend(self._federate(record, lvis))

    # ---------------------------------------------------------------- COCO keypoints
    def _keypoint_annotation(self, image_id, inst, geometry, front, size, Point):
        from pycocotools import mask as mask_util

        vertices = outline_vertices(geometry)
        flat, labelled = [], 0
        for k in extreme_vertices(vertices):
            x, y = (float(v) for v in vertices[k])
            if not (0 <= x < size and 0 <= y < size):
                flat += [0, 0, 0]
                continue
            hidden = front is not None and front.contains(Point(x, y))
            # COCO keypoints are pixel indices (Detectron2 adds 0.5 when it reads them)
            flat += [round(min(max(x - 0.5, 0), size - 1), 2), round(min(max(y - 0.5, 0), size - 1), 2),
                     1 if hidden else 2]
            labelled += 1
        rle = mask_util.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
        self.count["kp"] += 1
        return {"id": self.count["kp"], "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "keypoints": flat, "num_keypoints": labelled}

    # ---------------------------------------------------------------- LVIS
    def _lvis_annotation(self, image_id, category_id, polys, size):
        from pycocotools import mask as mask_util

        rle = mask_util.merge(mask_util.frPyObjects(polys, size, size))
        return {"image_id": image_id, "category_id": category_id, "segmentation": polys,
                "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)]}

    def _federate(self, record, anns):
        """LVIS's per-image labels: drop one of 2+ instances of a class at random (that class is
        then not exhaustive), and verify a random half of the absent classes as negatives."""
        by_class = {}
        for a in anns:
            by_class.setdefault(a["category_id"], []).append(a)
        not_exhaustive = []
        for c, group in sorted(by_class.items()):
            if len(group) >= 2 and self.rng.random() < NOT_EXHAUSTIVE_P:
                anns = [a for a in anns if a is not group[-1]]
                not_exhaustive.append(c)
        absent = [c for c in range(1, len(self.classes) + 1) if c not in by_class]
        negatives = sorted(int(c) for c in self.rng.permutation(absent)[:(len(absent) + 1) // 2])
        record["lvis"] = {"not_exhaustive_category_ids": not_exhaustive, "neg_category_ids": negatives}
        for a in anns:
            self.count["lvis"] += 1
            a["id"] = self.count["lvis"]
        return anns

    def _frequencies(self):
        """{category id: r/c/f} by rank of training image count (fewest first)."""
        counts = {c: set() for c in range(1, len(self.classes) + 1)}
        for a in self.lvis.get("train", []):
            counts[a["category_id"]].add(a["image_id"])
        ranked = sorted(counts, key=lambda c: (len(counts[c]), c))
        freq, start = {}, 0
        for letter, n in FREQUENCY_RANKS:
            freq.update({c: letter for c in ranked[start:start + n]})
            start += n
        freq.update({c: "f" for c in ranked[start:]})
        return freq, {c: len(v) for c, v in counts.items()}

    # ---------------------------------------------------------------- Cityscapes
    def _cityscapes(self, split, image_id, image, size, instances):
        from cityscapesscripts.helpers.annotation import Annotation
        from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
        from cityscapesscripts.preparation.json2labelImg import createLabelImage

        cities = CITIES[split]
        city = cities[image_id % len(cities)]
        base = f"{city}_{image_id:06d}_{FRAME:06d}"
        s = size * CITYSCAPES_SCALE
        objects = [{"label": "road", "polygon": [[0, 0], [s, 0], [s, s], [0, s]]}]
        objects += [{"label": self.cityscapes[self.classes[inst["category"]]],
                     "polygon": [[int(round(x * CITYSCAPES_SCALE)), int(round(y * CITYSCAPES_SCALE))]
                                 for x, y in inst["polygons"][0][0].tolist()]}
                    for inst in instances]
        text = json.dumps({"imgHeight": s, "imgWidth": s, "objects": objects})
        image = image.resize((s, s), resample=Image.BILINEAR)
        annotation = Annotation()
        annotation.fromJsonText(text)
        gt = self.corpus.cityscapes_gt(split) / city
        _write(self.corpus.cityscapes_images(split) / city / f"{base}_leftImg8bit.png", _png(image))
        _write(gt / f"{base}_gtFine_polygons.json", text.encode())
        _write(gt / f"{base}_gtFine_labelIds.png", _png(createLabelImage(annotation, "ids")))
        _write(gt / f"{base}_gtFine_instanceIds.png", _png(createInstanceImage(annotation, "ids")))

    # ---------------------------------------------------------------- the json files
    def finish(self):
        freq, image_counts = self._frequencies()
        instance_counts = {c: 0 for c in freq}
        for a in self.lvis.get("train", []):
            instance_counts[a["category_id"]] += 1
        lvis_categories = [{"id": k, "name": name, "synonyms": [name], "synset": f"{name}.n.01",
                            "def": f"a {name} shape", "frequency": freq[k], "image_count": image_counts[k],
                            "instance_count": instance_counts[k]}
                           for k, name in enumerate(self.classes, 1)]
        kp_category = [{"id": 1, "name": "shape", "supercategory": "shape", "keypoints": list(KEYPOINTS),
                        "skeleton": SKELETON}]
        for split, records in self.images.items():
            if "keypoints" in self.layouts:
                plain = [{k: v for k, v in r.items() if k != "lvis"} for r in records]
                contract.write_json(self.corpus.coco_keypoints(split),
                                    {"info": {"description": "synthetic shapes: extreme vertices"}, "licenses": [],
                                     "images": plain, "annotations": self.keypoints.get(split, []),
                                     "categories": kp_category}, mkdir=True)
            if "lvis" in self.layouts:
                lvis_images = [{"id": r["id"], "width": r["width"], "height": r["height"],
                                "coco_url": f"synthetic://shapes/{split}/{r['file_name']}", **r["lvis"]}
                               for r in records]
                contract.write_json(self.corpus.lvis_annotations(split),
                                    {"info": {"description": "synthetic shapes, LVIS v1 format"}, "licenses": [],
                                     "images": lvis_images, "annotations": self.lvis.get(split, []),
                                     "categories": lvis_categories}, mkdir=True)
        record = {"keypoints": list(KEYPOINTS), "keypoint_flip_map": [list(p) for p in KEYPOINT_FLIP],
                  "keypoint_skeleton": SKELETON} if "keypoints" in self.layouts else {}
        if "lvis" in self.layouts:
            record["lvis_frequency"] = {self.classes[k - 1]: f for k, f in sorted(freq.items())}
        if "cityscapes" in self.layouts:
            record["cityscapes_classes"] = self.cityscapes
        return {"task_layouts": record}


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
