"""The synthetic corpus's transfer-task splits (make_synthetic_data.py --layouts ...,keypoints,lvis,cityscapes), registered
with Detectron2's own loaders and metadata, as its builtins register the real datasets:
- shapes_kp_{train,val}: register_coco_instances + keypoint names and flip map (keypoints_coco_2017_*);
- shapes_lvis_{train,val}: load_lvis_json, evaluator_type "lvis" (lvis_v1_*: LVISEvaluator, federated);
- shapes_cityscapes_{train,val}: load_cityscapes_instances from the polygons json, with the builtin
  Cityscapes metadata (cityscapes_fine_instance_seg_*: CityscapesInstanceEvaluator).
Keypoint names and the class list come from the corpus's corpus.json (suite.contract)."""
import json

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_lvis_json, register_coco_instances
from detectron2.data.datasets.cityscapes import load_cityscapes_instances
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

TASK_SPLITS = {
    "shapes_kp_train": ("keypoints", "train"),
    "shapes_kp_val": ("keypoints", "val"),
    "shapes_lvis_train": ("lvis", "train"),
    "shapes_lvis_val": ("lvis", "val"),
    "shapes_cityscapes_train": ("cityscapes", "train"),
    "shapes_cityscapes_val": ("cityscapes", "val"),
}


def task_layouts(corpus):
    """corpus.json's record of the task layouts ({} when the corpus was made without them)."""
    try:
        return json.loads(corpus.record.read_text()).get("task_layouts") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def register_task_splits(corpus, classes):
    """(Re-)register the six splits of `corpus` (a suite.contract.Corpus)."""
    layouts = task_layouts(corpus)
    for name, (layout, split) in TASK_SPLITS.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        meta = MetadataCatalog.get(name)
        if layout == "keypoints":
            names = layouts.get("keypoints", [])
            register_coco_instances(name, {}, str(corpus.coco_keypoints(split)), str(corpus.coco_images(split)))
            meta.set(thing_classes=["shape"], keypoint_names=names,
                     keypoint_flip_map=[tuple(p) for p in layouts.get("keypoint_flip_map", [])],
                     keypoint_connection_rules=[(names[a - 1], names[b - 1], (255, 255, 0))
                                                for a, b in layouts.get("keypoint_skeleton", [])])
        elif layout == "lvis":
            # not register_lvis_instances: it would set the 1203 real LVIS classes for a "v1" name
            json_file, image_root = str(corpus.lvis_annotations(split)), f"{corpus.lvis_image_root}/"
            DatasetCatalog.register(name, lambda j=json_file, r=image_root: load_lvis_json(j, r))
            meta.set(json_file=json_file, image_root=image_root, evaluator_type="lvis", thing_classes=list(classes))
        else:
            image_dir, gt_dir = str(corpus.cityscapes_images(split)), str(corpus.cityscapes_gt(split))
            DatasetCatalog.register(name, lambda x=image_dir, y=gt_dir: load_cityscapes_instances(
                x, y, from_json=True, to_polygons=True))
            meta.set(image_dir=image_dir, gt_dir=gt_dir, evaluator_type="cityscapes_instance",
                     **_get_builtin_metadata("cityscapes"))
        meta.corpus_record = str(corpus.record)
