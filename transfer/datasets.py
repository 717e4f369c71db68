"""Datasets for fine-tuning: VOC, COCO (keypoints too), LVIS and Cityscapes are Detectron2's builtins
under $DETECTRON2_DATASETS; the synthetic shapes corpus is registered with Detectron2's own VOC and
COCO functions (SHAPES_ROOT), with the class list its corpus.json records, and its transfer-task
splits with Detectron2's keypoint, LVIS and Cityscapes loaders (transfer/task_datasets.py)."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc  # + builtins

from suite import contract
from transfer.task_datasets import TASK_SPLITS, register_task_splits

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


def shapes_classes(root):
    """The corpus's class names from its corpus.json; none when it has no readable one (the corpus is
    missing: check_datasets names what is)."""
    try:
        return list(contract.corpus_classes(root))
    except (OSError, ValueError):
        return []


def register_shapes(root=None):
    """(Re-)register the shapes splits rooted at `root` (default: shapes_root()): the four VOC/COCO
    ones and the transfer tasks' (TASK_SPLITS)."""
    corpus = contract.Corpus(root or shapes_root())
    classes = shapes_classes(corpus.root)
    for name, (layout, split) in SHAPES_SPLITS.items():
        if name in DatasetCatalog.list():  # re-rooting: registration is otherwise write-once
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if layout == "voc":
            register_pascal_voc(name, str(corpus.voc), split, 2007, classes)
            MetadataCatalog.get(name).evaluator_type = "pascal_voc"
        else:
            register_coco_instances(name, {}, str(corpus.coco_annotations(split)), str(corpus.coco_images(split)))
            MetadataCatalog.get(name).thing_classes = classes  # before the json is read
        MetadataCatalog.get(name).corpus_record = str(corpus.record)
    register_task_splits(corpus, classes)


def dataset_paths(name):
    """The files a registered dataset reads, from the metadata its registration recorded (for the
    shapes corpus, last, the corpus.json that names its classes)."""
    meta = MetadataCatalog.get(name)
    if meta.get("dirname"):  # Pascal VOC layout
        paths = [os.path.join(meta.dirname, "ImageSets", "Main", f"{meta.split}.txt")]
    elif meta.get("gt_dir"):  # Cityscapes layout
        paths = [meta.image_dir, meta.gt_dir]
    else:
        paths = [p for p in (meta.get("json_file"), meta.get("image_root")) if p]
    return paths + ([meta.corpus_record] if meta.get("corpus_record") else [])


def check_datasets(names):
    """Fail before building anything when a dataset's files are missing (one clear message)."""
    for name in names:
        if name not in DatasetCatalog.list():
            raise DatasetMissingError(
                f"dataset '{name}' is not registered; known: Detectron2's builtins and "
                f"{', '.join([*SHAPES_SPLITS, *TASK_SPLITS])}")
        for path in dataset_paths(name):
            if not os.path.exists(path):
                shapes = name in SHAPES_SPLITS or name in TASK_SPLITS
                env = "SHAPES_ROOT" if shapes else "DETECTRON2_DATASETS"
                root = shapes_root() if shapes else datasets_root()
                hint = (" (a corpus made with make_synthetic_data.py --layouts imagefolder,voc,coco,keypoints,lvis,cityscapes)"
                        if name in TASK_SPLITS else "")
                raise DatasetMissingError(
                    f"dataset '{name}': expected {path}, not found; set {env} (now {root}) "
                    f"to the folder holding it{hint} (README: Datasets)")
