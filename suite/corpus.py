"""Seeded synthetic "shapes" corpus with boxes and masks, written once in the ImageFolder, Pascal
VOC (VOC2007) and COCO layouts (docs/formats.md; the folders: suite.contract.Corpus), with the
semi-supervised subset lists of its train images (subsets/1percent.txt, 10percent.txt). Two presets:
`scenes`, textured scenes of 1-6 occluding coloured shapes (detection), and `objects`, one grey
shape on a plain dark ground, the object-centric corpus on which pretraining learns the classes in
CPU minutes (docs/bench.md). Its corpus.json records the class list: readers take it from there
(suite.contract.corpus_classes), never from this module. Command: tools/make_synthetic_data.py."""
import argparse
import colorsys
import io
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from suite import contract

CLASSES = ("circle", "square", "triangle", "star", "hexagon", "cross", "ring", "crescent")
JPEG_QUALITY = 90
MAX_OBJECTS = 6
# Areas as fractions of the image: the labelled (largest) object is drawn from a range above
# the distractors' so "class of the largest object" stays the class the round-robin chose.
TARGET_AREA = (0.06, 0.14)
OTHER_AREA = (0.008, 0.035)
# Fraction of an object that must stay visible under later ones (partial, not total occlusion).
MIN_VISIBLE = {"target": 0.7, "other": 0.45}


@dataclass(frozen=True)
class Preset:
    """What a corpus looks like: objects per image, the labelled object's area (fraction of the
    image), the painting: "textured" (random textured grounds, coloured shaded objects) or
    "plain" (a fixed grey object on a fixed dark ground), and whether objects stand upright
    (no rotation, no aspect change) or are rotated and stretched at random."""
    max_objects: int
    target_area: tuple
    paint: str
    upright: bool = False


# objects: what the image holds is its class alone. One object, large (a 0.4-1 crop keeps most
# of it), upright; a fixed grey on a fixed dark ground, so no colour, texture, brightness or
# angle tells two images apart (crops take away position and size) and instance discrimination
# has to use the shape. On `scenes` the background and colours identify an image, and rotated
# shapes their angle: short contrastive runs learn those instead of the class (docs/bench.md).
PRESETS = {
    "scenes": Preset(MAX_OBJECTS, TARGET_AREA, "textured"),
    "objects": Preset(1, (0.25, 0.5), "plain", upright=True),
}
PLAIN_GROUND, GREY_FILL = 35.0, 210.0


class CorpusError(ValueError):
    """Bad arguments or output directory: the message names the path and the fix."""


def _regular(n, r=1.0, phase=np.pi / 2):
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(t), -r * np.sin(t)], 1)


def _star():
    pts = _regular(10)
    pts[1::2] *= 0.45
    return pts


def _cross(w=0.34):
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                     (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=float)


# Each shape: (filled polygons, hole polygons) on the unit disc, before rotation and aspect.
_CIRCLE = _regular(40)
SHAPES = {
    "circle": ([_CIRCLE], []),
    "square": ([_regular(4, phase=np.pi / 4)], []),
    "triangle": ([_regular(3)], []),
    "star": ([_star()], []),
    "hexagon": ([_regular(6)], []),
    "cross": ([_cross()], []),
    "ring": ([_CIRCLE], [_CIRCLE * 0.55]),
    "crescent": ([_CIRCLE], [_CIRCLE * 0.9 + [0.45, -0.1]]),
}
assert tuple(SHAPES) == CLASSES


def _polygon_area(p):
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def _unit_area(name):
    """Area of a shape at radius 1, measured on a raster so holes cut off at the edge count."""
    fills, holes = SHAPES[name]
    if not holes:
        return sum(_polygon_area(p) for p in fills)
    return _rasterize(name, (100.0, 100.0), 90.0, 0.0, 1.0, 200).sum() / 90.0 ** 2


def _place(name, center, radius, angle, aspect):
    """Image-space (fills, holes): unit polygons scaled by radius*(aspect, 1/aspect), rotated."""
    c, s = np.cos(angle), np.sin(angle)
    transform = np.array([[c, -s], [s, c]]) @ np.diag([radius * aspect, radius / aspect])
    fills, holes = SHAPES[name]
    return [p @ transform.T + center for p in fills], [p @ transform.T + center for p in holes]


def _rasterize(name, center, radius, angle, aspect, size):
    """Boolean mask of one placed shape (no anti-aliasing, so masks are exact pixel sets)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for polys, value in zip(_place(name, center, radius, angle, aspect), (1, 0)):
        for xy in polys:
            draw.polygon([tuple(v) for v in xy.tolist()], fill=value)
    return np.asarray(canvas, dtype=bool)


UNIT_AREA = {name: _unit_area(name) for name in CLASSES}


def _random_color(rng, sat=(0.45, 1.0), val=(0.45, 1.0)):
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb, dtype=np.float32) * 255


def _background(rng, size):
    """A textured background: gradient, smooth noise, stripes or clutter (float HxWx3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = _random_color(rng, (0.0, 0.7)), _random_color(rng, (0.0, 0.7))
    kind = rng.integers(4)
    if kind == 0:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif kind == 1:  # low-frequency noise: a small random grid upsampled bilinearly
        g = rng.integers(3, 9)
        small = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8))
        t = np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    elif kind == 2:  # stripes of random period and orientation
        a, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period)
    else:  # flat tone, the clutter below does the texturing
        t = np.zeros_like(xx)
    img = c0 + t[..., None] * (c1 - c0)
    if kind == 3 or rng.random() < 0.3:
        img = _clutter(rng, img, size)
    return img


def _clutter(rng, img, size):
    """Thin lines and small dots: edges that are not objects, so detectors cannot key on them."""
    canvas = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(6, 16)):
        color = tuple(int(v) for v in _random_color(rng, (0.0, 0.8)))
        x0, y0 = rng.uniform(0, size, 2)
        if rng.random() < 0.6:
            x1, y1 = rng.uniform(0, size, 2)
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(0.01, 0.03) * size
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=color)
    return np.asarray(canvas, dtype=np.float32)


def _sample_object(rng, cls, area_range, size, upright=False):
    """One placed object; `upright`: at angle 0 and aspect 1 (the same draws are made, so the
    rest of a corpus does not depend on it)."""
    aspect = float(np.exp(rng.uniform(-0.3, 0.3)))
    radius = np.sqrt(rng.uniform(*area_range) * size * size / UNIT_AREA[CLASSES[cls]])
    margin = 0.6 * radius  # lets objects leave the frame a little (VOC "truncated")
    center = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)
    if upright:
        angle, aspect = 0.0, 1.0
    mask = _rasterize(CLASSES[cls], center, radius, angle, aspect, size)
    polygons = _place(CLASSES[cls], center, radius, angle, aspect)
    fills = np.concatenate(polygons[0])
    truncated = bool((fills < 0).any() or (fills > size).any())  # VOC: extends past the frame
    return {"category": cls, "mask": mask, "full": int(mask.sum()), "truncated": truncated,
            "polygons": polygons}


def _compose(rng, target, size, min_pixels, max_objects, target_area, upright=False):
    """Stack 1-max_objects objects back to front; refuse any that would hide too much of those
    below."""
    n = int(rng.integers(1, max_objects + 1))
    slot = int(rng.integers(n))  # depth of the labelled object
    labels = np.zeros((size, size), np.int16)  # label map: index+1 of the visible object
    objects = []
    for i in range(n):
        is_target = i == slot
        for _ in range(6):
            cls = target if is_target else int(rng.integers(len(CLASSES)))
            obj = _sample_object(rng, cls, target_area if is_target else OTHER_AREA, size, upright)
            if obj["full"] < min_pixels:
                continue
            trial = labels.copy()
            trial[obj["mask"]] = len(objects) + 1
            visible = np.bincount(trial.ravel(), minlength=len(objects) + 2)[1:]
            if all(visible[j] >= max(min_pixels, MIN_VISIBLE[o["role"]] * o["full"])
                   for j, o in enumerate(objects)):
                obj["role"] = "target" if is_target else "other"
                objects.append(obj)
                labels = trial
                break
    return labels, objects


def _paint(rng, size, objects, labels, preset):
    if preset.paint == "plain":
        img = np.full((size, size, 3), PLAIN_GROUND, np.float32)
        for j in range(len(objects)):
            img[labels == j + 1] = GREY_FILL
        img += rng.normal(0, 4.0, img.shape).astype(np.float32)
        return Image.fromarray(img.clip(0, 255).astype(np.uint8))
    img = _background(rng, size)
    bg_mean = img.reshape(-1, 3).mean(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for j, obj in enumerate(objects):
        for _ in range(8):  # keep objects distinguishable from the background
            color = _random_color(rng)
            if np.abs(color - bg_mean).sum() > 120:
                break
        a = rng.uniform(0, 2 * np.pi)  # soft shading so objects are not flat colour
        shade = 0.8 + 0.35 * (np.cos(a) * xx + np.sin(a) * yy)
        m = labels == j + 1
        img[m] = color * shade[m][:, None]
    img += rng.normal(0, 4.0, img.shape).astype(np.float32)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_image(rng, target, size, preset=PRESETS["scenes"]):
    """One scene (of `preset`) whose largest visible object has class `target`.

    Returns the PIL image and a list of visible instances (category, bool mask, truncated, and
    the placed shape's (fill, hole) polygons), back to front; masks are what remains visible after
    occlusion.
    """
    min_pixels = max(10, int(0.0025 * size * size))
    for attempt in range(20):
        # the last attempt is the target alone, which always satisfies the contract
        labels, objects = _compose(rng, target, size, min_pixels,
                                   1 if attempt == 19 else preset.max_objects, preset.target_area,
                                   preset.upright)
        areas = np.bincount(labels.ravel(), minlength=len(objects) + 1)[1:]
        keep = [j for j in range(len(objects)) if areas[j] >= min_pixels]
        if keep and objects[max(keep, key=lambda j: areas[j])]["category"] == target:
            break
    image = _paint(rng, size, objects, labels, preset)
    instances = [{"category": objects[j]["category"], "mask": labels == j + 1,
                  "truncated": objects[j]["truncated"], "polygons": objects[j]["polygons"]}
                 for j in keep]
    return image, instances


def _largest_class(instances):
    return max(instances, key=lambda i: int(i["mask"].sum()))["category"]


def _box(mask):
    """Tight [x0, y0, x1, y1) pixel box of a mask (exclusive right/bottom edges)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _voc_xml(image_id, size, instances):
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "Synthetic shapes"
    sz = ET.SubElement(root, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for inst in instances:
        x0, y0, x1, y1 = _box(inst["mask"])
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASSES[inst["category"]]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(inst["truncated"]))
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        # VOC boxes are 1-based inclusive pixel indices: xmin = first column + 1, xmax = last + 1
        for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _coco_annotations(image_id, first_ann_id, instances):
    """COCO records with RLE masks: visible masks can have holes (ring, an object on top) that
    polygons cannot express; Detectron2 reads them with INPUT.MASK_FORMAT "bitmask"."""
    try:
        from pycocotools import mask as mask_util
    except ImportError:
        raise CorpusError("pycocotools is needed to write the COCO masks: "
                          "pip install pycocotools") from None

    anns = []
    for k, inst in enumerate(instances):
        rle = mask_util.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
        x0, y0, x1, y1 = _box(inst["mask"])
        anns.append({
            "id": first_ann_id + k, "image_id": image_id, "category_id": inst["category"] + 1,
            "segmentation": {"size": [int(v) for v in rle["size"]],
                             "counts": rle["counts"].decode("ascii")},
            "area": float(mask_util.area(rle)), "bbox": [x0, y0, x1 - x0, y1 - y0],
            "iscrowd": 0,
        })
    return anns


def _put(path, data):
    """One file of the corpus (the corpus folder as a whole is replaced in one step: make_corpus)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


SUBSET_FRACTIONS = {"semi_1pct": 0.01, "semi_10pct": 0.10}  # of the train images, per class


def subset_names(names_by_class, fraction, rng):
    """A semi-supervised subset list (SimCLR's 1percent.txt format: file names): per class
    ceil(fraction * its count) names, at least one, drawn without replacement by `rng`."""
    out = []
    for label in sorted(names_by_class):
        names = sorted(names_by_class[label])
        n = min(len(names), max(1, int(np.ceil(fraction * len(names)))))
        out += [names[i] for i in sorted(rng.choice(len(names), n, replace=False))]
    return out


def _check_args(out, seed, num_train, num_test, size, overwrite, preset):
    if preset not in PRESETS:
        raise CorpusError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    for name, value in (("num_train", num_train), ("num_test", num_test), ("size", size)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise CorpusError(f"{name} must be a positive integer, got {value!r}")
    if size < 32:
        raise CorpusError(f"size must be at least 32 pixels for shapes to be recognisable, "
                          f"got {size}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CorpusError(f"seed must be a non-negative integer, got {seed!r}")
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} exists and is not a directory: choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CorpusError(f"--out {out} is not empty: pass --overwrite or choose an "
                              f"empty or new directory")
        if not contract.Corpus(out).record.is_file():
            raise CorpusError(f"--out {out} is not a corpus made by this tool (no corpus.json): "
                              f"refusing to overwrite it, choose another directory")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CorpusError(f"--out {out} is not writable ({parent} is not a writable "
                          f"directory): choose a path you can write to")


LAYOUTS = ("imagefolder", "voc", "coco")
# the transfer tasks' layouts (suite/corpus_tasks.py), written only when asked for; keypoints and
# lvis annotate the coco/ images
TASK_LAYOUTS = ("keypoints", "lvis", "cityscapes")


def make_corpus(out, seed=0, num_train=800, num_test=200, size=128, overwrite=False,
                preset="scenes", layouts=LAYOUTS):
    """Write the corpus of `preset` to `out` (see docs/formats.md) and return it as a Path.
    `layouts`: which of LAYOUTS and TASK_LAYOUTS to write (the same images in each); imagefolder
    alone needs neither pycocotools nor Detectron2 (a pretraining-only machine).

    Built in a sibling folder that replaces `out` at the end (suite.contract.replace_dir), so
    `out` never holds half a corpus. Raises CorpusError for bad arguments or an unusable `out`.
    """
    out = Path(out).expanduser().absolute()
    _check_args(out, seed, num_train, num_test, size, overwrite, preset)
    unknown = sorted(set(layouts) - set(LAYOUTS + TASK_LAYOUTS))
    if unknown or not layouts:
        raise CorpusError(f"layouts {unknown or 'none'}: choose among {', '.join(LAYOUTS + TASK_LAYOUTS)}")
    if {"keypoints", "lvis"} & set(layouts) and "coco" not in layouts:
        raise CorpusError("layouts keypoints and lvis annotate the coco/ images: add coco to the layouts")
    try:
        contract.replace_dir(out, lambda stage: _write_corpus(stage, seed, num_train, num_test, size, preset,
                                                              set(layouts)))
    except OSError as e:
        raise CorpusError(f"writing the corpus to {out} failed ({e.strerror or e}): check that its folder "
                          f"is writable and has free space") from None
    return out


def _write_corpus(root, seed, num_train, num_test, size, preset, layouts=frozenset(LAYOUTS)):
    corpus = contract.Corpus(root)
    rng = np.random.default_rng(seed)
    extra = None
    if set(TASK_LAYOUTS) & set(layouts):
        from suite.corpus_tasks import TaskLayouts
        extra = TaskLayouts(root, CLASSES, seed, set(TASK_LAYOUTS) & set(layouts))
    splits = (("train", "trainval", num_train), ("val", "test", num_test))
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"}
                  for k, name in enumerate(CLASSES)]
    image_id, ann_id, counts, train_names = 0, 0, {}, {}
    for coco_split, voc_split, n in splits:
        images, anns, ids = [], [], []
        for i in range(n):
            image_id += 1
            name = f"{image_id:06d}"
            # Round-robin over classes keeps every ImageFolder class in both splits.
            image, instances = make_image(rng, i % len(CLASSES), size, PRESETS[preset])
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=JPEG_QUALITY)
            jpeg = buf.getvalue()
            label = CLASSES[_largest_class(instances)]
            counts.setdefault(coco_split, {}).setdefault(label, 0)
            counts[coco_split][label] += 1
            if "imagefolder" in layouts:
                _put(corpus.imagefolder / coco_split / label / f"{name}.jpg", jpeg)
                if coco_split == "train":
                    train_names.setdefault(label, []).append(f"{name}.jpg")
            if "voc" in layouts:
                _put(corpus.voc / "JPEGImages" / f"{name}.jpg", jpeg)
                _put(corpus.voc / "Annotations" / f"{name}.xml", _voc_xml(name, size, instances))
            if extra:
                extra.add(coco_split, image_id, name, image, size, instances)
            if "coco" in layouts:
                _put(corpus.coco_images(coco_split) / f"{name}.jpg", jpeg)
                images.append({"id": image_id, "file_name": f"{name}.jpg", "width": size,
                               "height": size})
                new = _coco_annotations(image_id, ann_id + 1, instances)
                ann_id += len(new)
                anns += new
            ids.append(name)
        if "voc" in layouts:
            _put(corpus.voc / "ImageSets" / "Main" / f"{voc_split}.txt", "".join(f"{x}\n" for x in ids).encode())
        if "coco" in layouts:
            contract.write_json(corpus.coco_annotations(coco_split),
                                {"info": {"description": "synthetic shapes", "version": "1.0"},
                                 "licenses": [], "images": images, "annotations": anns,
                                 "categories": categories}, sort_keys=True, mkdir=True)
    if "imagefolder" in layouts:  # the semi-supervised subsets of its train/
        for task, fraction in SUBSET_FRACTIONS.items():
            names = subset_names(train_names, fraction, np.random.default_rng((seed, round(fraction * 100))))
            _put(corpus.subsets / contract.SEMI_SUBSETS[task], "".join(f"{x}\n" for x in names).encode())
    tasks = extra.finish() if extra else {}
    contract.write_json(corpus.record,
                {"generator": "tools/make_synthetic_data.py", "seed": seed, "preset": preset,
                 "preset_values": asdict(PRESETS[preset]),
                 "num_train": num_train, "num_test": num_test, "size": size, "layouts": sorted(layouts),
                 "classes": list(CLASSES), "jpeg_quality": JPEG_QUALITY,
                 "imagefolder_counts": counts, **tasks}, sort_keys=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=800)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--preset", default="scenes", choices=sorted(PRESETS),
                        help="scenes: 1-6 coloured shapes on textured grounds (default); "
                             "objects: one grey shape on a plain ground (docs/bench.md)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated layouts to write (default: {','.join(LAYOUTS)}): imagefolder "
                             f"alone needs no pycocotools; the transfer tasks' {','.join(TASK_LAYOUTS)} "
                             "(suite/corpus_tasks.py) are written only when named")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing corpus in --out")
    args = parser.parse_args(argv)
    try:
        out = make_corpus(args.out, args.seed, args.num_train, args.num_test, args.size,
                          args.overwrite, args.preset, [x for x in args.layouts.split(",") if x])
    except CorpusError as e:
        print(f"make_synthetic_data.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"make_synthetic_data.py: error: --out {args.out} cannot be written ({e.strerror or e}: "
              f"{e.filename}); pass a writable folder", file=sys.stderr)
        return 2
    print(f"wrote {args.num_train} train + {args.num_test} test images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
