"""Datasets for fine-tuning: VOC and COCO are Detectron2's builtins under $DETECTRON2_DATASETS; the
synthetic shapes corpus is registered with Detectron2's own VOC and COCO functions (SHAPES_ROOT)."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc  # + builtins

# name -> (layout, split) inside the corpus written by tools/make_synthetic_data.py
SHAPES_SPLITS = {
    "shapes_voc_trainval": ("voc", "trainval"),
    "shapes_voc_test": ("voc", "test"),
    "shapes_coco_train": ("coco", "train"),
    "shapes_coco_val": ("coco", "val"),
}


class DatasetMissingError(FileNotFoundError):
    """A registered dataset whose files are not on disk: the message names the path and the fix."""


def datasets_root():
    """Where Detectron2's builtins look: $DETECTRON2_DATASETS, default ./datasets (its own rule)."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def shapes_root():
    """The synthetic corpus: $SHAPES_ROOT, default $DETECTRON2_DATASETS/shapes."""
    return os.path.expanduser(os.getenv("SHAPES_ROOT", os.path.join(datasets_root(), "shapes")))


def register_shapes(root=None):
    """(Re-)register the four shapes splits rooted at `root` (default: shapes_root())."""
    from tools.make_synthetic_data import CLASSES

    root = str(root or shapes_root())
    for name, (layout, split) in SHAPES_SPLITS.items():
        if name in DatasetCatalog.list():  # re-rooting: registration is otherwise write-once
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if layout == "voc":
            register_pascal_voc(name, os.path.join(root, "VOC2007"), split, 2007, list(CLASSES))
            MetadataCatalog.get(name).evaluator_type = "pascal_voc"
        else:
            coco = os.path.join(root, "coco")
            register_coco_instances(name, {}, os.path.join(coco, "annotations", f"instances_{split}.json"),
                                    os.path.join(coco, split))
            MetadataCatalog.get(name).thing_classes = list(CLASSES)  # before the json is read


def dataset_paths(name):
    """The files a registered dataset reads, from the metadata its registration recorded."""
    meta = MetadataCatalog.get(name)
    if meta.get("dirname"):  # Pascal VOC layout
        return [os.path.join(meta.dirname, "ImageSets", "Main", f"{meta.split}.txt")]
    return [p for p in (meta.get("json_file"), meta.get("image_root")) if p]


def check_datasets(names):
    """Fail before building anything when a dataset's files are missing (one clear message)."""
    for name in names:
        if name not in DatasetCatalog.list():
            raise DatasetMissingError(
                f"dataset '{name}' is not registered; known: VOC/COCO builtins and "
                f"{', '.join(SHAPES_SPLITS)}")
        for path in dataset_paths(name):
            if not os.path.exists(path):
                env = "SHAPES_ROOT" if name in SHAPES_SPLITS else "DETECTRON2_DATASETS"
                root = shapes_root() if name in SHAPES_SPLITS else datasets_root()
                raise DatasetMissingError(
                    f"dataset '{name}': expected {path}, not found; set {env} (now {root}) "
                    "to the folder holding it (README: Datasets)")
