"""The synthetic corpus is real VOC, COCO and ImageFolder data: read it with Detectron2,
pycocotools and torchvision; same seed gives the same bytes; bad input exits with code 2."""
import filecmp
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from suite.corpus import CLASSES, CorpusError, main, make_corpus, make_image

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TEST, SIZE = 48, 24, 64  # the conftest `corpus` fixture


@pytest.fixture(scope="module")
def coco(corpus):
    from pycocotools.coco import COCO

    return {split: COCO(str(corpus / "coco" / "annotations" / f"instances_{split}.json"))
            for split in ("train", "val")}


def test_classes_are_distinct_names():
    assert len(CLASSES) >= 6 and len(set(CLASSES)) == len(CLASSES)
    assert all(isinstance(c, str) and c.isidentifier() for c in CLASSES)


@pytest.mark.detectron2
def test_detectron2_reads_voc_splits(corpus):
    from detectron2.data.datasets.pascal_voc import load_voc_instances
    from PIL import Image

    voc = corpus / "VOC2007"
    seen = Counter()
    for split, n in (("trainval", NUM_TRAIN), ("test", NUM_TEST)):
        dicts = load_voc_instances(str(voc), split, CLASSES)
        assert len(dicts) == n
        for d in dicts:
            assert Path(d["file_name"]).is_file()
            assert Image.open(d["file_name"]).size == (d["width"], d["height"]) == (SIZE, SIZE)
            assert 1 <= len(d["annotations"]) <= 6
            for a in d["annotations"]:
                x0, y0, x1, y1 = a["bbox"]
                assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
                seen[a["category_id"]] += 1
    assert set(seen) == set(range(len(CLASSES)))
    trainval = (voc / "ImageSets/Main/trainval.txt").read_text().split()
    test = (voc / "ImageSets/Main/test.txt").read_text().split()
    assert not set(trainval) & set(test)


def test_voc_xml_has_standard_fields(corpus):
    xml = ET.parse(next((corpus / "VOC2007" / "Annotations").glob("*.xml")))
    assert xml.find("filename").text.endswith(".jpg")
    assert xml.find("size/depth").text == "3"
    for obj in xml.findall("object"):
        for field in ("name", "pose", "truncated", "difficult", "bndbox/xmin", "bndbox/ymax"):
            assert obj.find(field) is not None, field
        assert 1 <= int(obj.find("bndbox/xmin").text) <= int(obj.find("bndbox/xmax").text)


def test_coco_masks_agree_with_boxes_and_areas(corpus, coco):
    for split, n in (("train", NUM_TRAIN), ("val", NUM_TEST)):
        api = coco[split]
        assert len(api.getImgIds()) == n
        assert [c["name"] for c in api.loadCats(api.getCatIds())] == list(CLASSES)
        for img in api.loadImgs(api.getImgIds()):
            assert (corpus / "coco" / split / img["file_name"]).is_file()
            anns = api.loadAnns(api.getAnnIds(imgIds=img["id"]))
            assert anns, "every image has at least one object"
            union = np.zeros((img["height"], img["width"]), int)
            for a in anns:
                m = api.annToMask(a)
                assert a["iscrowd"] == 0 and m.sum() == a["area"] > 0
                ys, xs = np.nonzero(m)
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                     ys.max() - ys.min() + 1]
                union += m
            assert union.max() == 1, "visible masks after occlusion never overlap"


def test_coco_and_voc_describe_the_same_objects(corpus, coco):
    api = coco["val"]
    for img in api.loadImgs(api.getImgIds()[:8]):
        xml = ET.parse(corpus / "VOC2007" / "Annotations" / img["file_name"].replace("jpg", "xml"))
        voc = sorted((o.find("name").text, *(int(o.find(f"bndbox/{k}").text) - (k[1:] == "min")
                                              for k in ("xmin", "ymin", "xmax", "ymax")))
                     for o in xml.findall("object"))
        ref = sorted((CLASSES[a["category_id"] - 1], a["bbox"][0], a["bbox"][1],
                      a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                     for a in api.loadAnns(api.getAnnIds(imgIds=img["id"])))
        assert voc == ref


def test_imagefolder_class_is_largest_object(corpus, coco):
    from torchvision.datasets import ImageFolder

    for split, n in (("train", NUM_TRAIN), ("val", NUM_TEST)):
        ds = ImageFolder(str(corpus / "imagefolder" / split))
        assert ds.classes == sorted(CLASSES) and len(ds) == n
        # every class in both splits, even for small N (round-robin over classes)
        assert set(ds.targets) == set(range(len(CLASSES)))
        assert ds[0][0].size == (SIZE, SIZE)
        api = coco[split]
        by_name = {i["file_name"]: i["id"] for i in api.loadImgs(api.getImgIds())}
        for path, target in ds.samples:
            anns = api.loadAnns(api.getAnnIds(imgIds=by_name[Path(path).name]))
            largest = max(anns, key=lambda a: a["area"])
            assert ds.classes[target] == CLASSES[largest["category_id"] - 1]
            # the same image bytes in all three layouts
            assert filecmp.cmp(path, corpus / "coco" / split / Path(path).name, shallow=False)


def test_same_seed_same_bytes_other_seed_differs(corpus, tmp_path):
    again = make_corpus(tmp_path / "again", seed=0, num_train=NUM_TRAIN, num_test=NUM_TEST,
                        size=SIZE)
    files = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (corpus / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = make_corpus(tmp_path / "other", seed=1, num_train=2, num_test=1, size=SIZE)
    jpeg = "VOC2007/JPEGImages/000001.jpg"
    assert (other / jpeg).read_bytes() != (corpus / jpeg).read_bytes()
    assert json.loads((corpus / "corpus.json").read_text())["classes"] == list(CLASSES)


def test_scenes_vary_and_occlude():
    rng = np.random.default_rng(0)
    counts, occluded = Counter(), 0
    for i in range(40):
        _, instances = make_image(rng, i % len(CLASSES), 64)
        counts[len(instances)] += 1
        masks = [inst["mask"] for inst in instances]
        # an object partly hidden has a visible mask that is not its full silhouette: detect
        # it as a mask whose box holds pixels of a later (upper) object
        for j, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            box = np.zeros_like(m)
            box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
            occluded += any((box & later).any() for later in masks[j + 1:])
    assert min(counts) == 1 and max(counts) >= 5
    assert occluded > 0


def test_overwrite_replaces_a_corpus(tmp_path):
    out = make_corpus(tmp_path / "c", seed=0, num_train=1, num_test=1, size=32)
    make_corpus(out, seed=0, num_train=2, num_test=1, size=32, overwrite=True)
    assert len(list((out / "VOC2007" / "JPEGImages").glob("*.jpg"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging removed"


@pytest.mark.parametrize("case", ["unwritable", "size", "count", "non_empty", "not_a_corpus"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    args = {"unwritable": ["--out", str(blocker / "sub")],
            "size": ["--out", str(tmp_path / "a"), "--size", "0"],
            "count": ["--out", str(tmp_path / "a"), "--num-train", "-3"],
            "non_empty": ["--out", str(tmp_path / "full")],
            "not_a_corpus": ["--out", str(tmp_path / "full"), "--overwrite"]}[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x", "never deletes user files"
    assert not (tmp_path / "a").exists()


def test_cli_exit_code(tmp_path):
    bad = subprocess.run([sys.executable, "tools/make_synthetic_data.py", "--out",
                          str(tmp_path / "x"), "--size", "-1"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "size" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, "tools/make_synthetic_data.py", "--out",
                         str(tmp_path / "y"), "--num-train", "2", "--num-test", "1",
                         "--size", "32"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "y" / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text() == "000003\n"


@pytest.mark.detectron2
def test_detectron2_reads_coco_masks(corpus, coco):
    from detectron2.data import detection_utils
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(str(corpus / "coco/annotations/instances_val.json"),
                           str(corpus / "coco/val"), "synthetic_shapes_test_val")
    assert len(dicts) == NUM_TEST and Path(dicts[0]["file_name"]).is_file()
    # RLE masks: Detectron2 needs INPUT.MASK_FORMAT "bitmask" for them
    inst = detection_utils.annotations_to_instances(dicts[0]["annotations"], (SIZE, SIZE),
                                                    mask_format="bitmask")
    areas = [a["area"] for a in coco["val"].loadAnns(coco["val"].getAnnIds(
        imgIds=dicts[0]["image_id"]))]
    assert inst.gt_masks.tensor.sum((1, 2)).tolist() == areas
    assert (inst.gt_masks.get_bounding_boxes().tensor == inst.gt_boxes.tensor).all()


def test_objects_preset_is_one_upright_grey_shape_on_a_plain_ground(tmp_path):
    """The bench corpus: nothing but the shape's class (and its size and place) varies."""
    from suite.corpus import GREY_FILL, PLAIN_GROUND, PRESETS

    rng = np.random.default_rng(0)
    for i in range(16):
        image, instances = make_image(rng, i % len(CLASSES), 64, PRESETS["objects"])
        assert len(instances) == 1 and instances[0]["category"] == i % len(CLASSES)
        pixels, mask = np.asarray(image, dtype=float), instances[0]["mask"]
        assert 0.15 < mask.mean() < 0.55                 # area 0.25-0.5, a little may leave the frame
        inside, outside = pixels[mask].mean(0), pixels[~mask].mean(0)
        assert np.allclose(inside, GREY_FILL, atol=8) and np.allclose(outside, PLAIN_GROUND, atol=8)
    # upright: an axis-aligned square fills its bounding box
    _, (square,) = make_image(np.random.default_rng(1), CLASSES.index("square"), 64, PRESETS["objects"])
    ys, xs = np.nonzero(square["mask"])
    assert square["mask"][ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() > 0.97
    out = make_corpus(tmp_path / "o", seed=0, num_train=8, num_test=8, size=64, preset="objects")
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["preset"] == "objects" and meta["preset_values"]["upright"] is True
    with pytest.raises(ValueError, match="unknown preset"):
        make_corpus(tmp_path / "x", seed=0, num_train=8, num_test=8, size=64, preset="nope")


def test_imagefolder_layout_alone_holds_the_same_images_and_no_other_layout(corpus, tmp_path):
    """A pretraining-only machine (the GPU device: no pycocotools) writes the ImageFolder alone,
    image for image the full corpus's."""
    out = make_corpus(tmp_path / "if", seed=0, num_train=NUM_TRAIN, num_test=NUM_TEST, size=SIZE,
                      layouts=["imagefolder"])
    # the semi-supervised subset lists name ImageFolder images: they come with it
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "imagefolder", "subsets"]
    full = sorted((corpus / "imagefolder").rglob("*.jpg"))
    alone = sorted((out / "imagefolder").rglob("*.jpg"))
    assert [p.relative_to(corpus) for p in full] == [p.relative_to(out) for p in alone]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(full, alone))
    with pytest.raises(CorpusError, match="choose among"):
        make_corpus(tmp_path / "bad", layouts=["imagefolder", "yolo"])
