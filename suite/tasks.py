"""The transfer tasks `slurm/submit.py pipeline --tasks` and slurm.pipeline.build_stages accept, in
one place: each task's reference config (real data), its synthetic twin (the same protocol on the
shapes corpus at test size) and the metric its community reports, as the results table's columns.

Standard library only (the launcher and the table import it). A new task is one TASKS entry; a new
kind of stage (not a Detectron2 fine-tune) also needs its stage builder in slurm/pipeline.py."""
from dataclasses import dataclass
from pathlib import Path

from suite import contract

DETECTRON2 = "detectron2"  # the stage: transfer/train_net.py --config-file CONFIG (one run per seed)


@dataclass(frozen=True)
class Task:
    name: str        # the --tasks name
    kind: str        # the stage that runs it (DETECTRON2)
    config: str      # the reference config, repository-relative: real data, the reference schedule
    synthetic: str   # the same model and protocol on the synthetic corpus (tests, CPU)
    metric: str      # METRICS key: the table's columns
    heavy: bool      # COCO-sized: fine-tuned --coco-seeds times; else --seeds times
    layout: str      # the dataset layout it expects (README: Transfer tasks)


TASKS = {t.name: t for t in (
    Task("voc07", DETECTRON2, "configs/detection/voc07_R_50_C4.yaml",
         "configs/detection/demo_shapes_voc_R_18_C4.yaml", "voc", False,
         "$DETECTRON2_DATASETS/VOC2007/{Annotations,ImageSets/Main,JPEGImages}"),
    Task("coco_kp", DETECTRON2, "configs/detection/coco_kp_R_50_FPN_2x.yaml",
         "configs/detection/demo_shapes_kp_R_18_FPN.yaml", "keypoints", True,
         "$DETECTRON2_DATASETS/coco/{train2017,val2017}, coco/annotations/person_keypoints_{train,val}2017.json"),
    Task("lvis", DETECTRON2, "configs/detection/lvis_v1_R_50_FPN_1x.yaml",
         "configs/detection/demo_shapes_lvis_R_18_FPN.yaml", "lvis", True,
         "$DETECTRON2_DATASETS/coco/{train2017,val2017}, lvis/lvis_v1_{train,val}.json"),
    Task("cityscapes", DETECTRON2, "configs/detection/cityscapes_R_50_FPN.yaml",
         "configs/detection/demo_shapes_cityscapes_R_18_FPN.yaml", "cityscapes", False,
         "$DETECTRON2_DATASETS/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/"),
)}

# the task names of their reference runs (config file stems, as suite.contract.task_name): the
# table puts no published VOC07+12 / COCO rows beside these (another dataset or protocol)
TASK_FOLDERS = frozenset(Path(t.config).stem for t in TASKS.values())

# The table's columns of each metric: (column, final_metrics.json results section, key). What each
# community reports first: VOC AP50; COCO box and mask AP; keypoint AP (OKS); LVIS mask AP with the
# rare / common / frequent split; Cityscapes mask AP (cityscapesscripts, AP and AP50).
METRICS = {
    "voc": (("AP50", "bbox", "AP50"), ("AP", "bbox", "AP"), ("AP75", "bbox", "AP75")),
    "coco": (("AP (bbox)", "bbox", "AP"), ("AP (segm)", "segm", "AP")),
    "keypoints": (("AP (kp)", "keypoints", "AP"), ("AP50 (kp)", "keypoints", "AP50"),
                  ("AP75 (kp)", "keypoints", "AP75"), ("AP (bbox)", "bbox", "AP")),
    "lvis": (("AP (segm)", "segm", "AP"), ("APr", "segm", "APr"), ("APc", "segm", "APc"),
             ("APf", "segm", "APf"), ("AP (bbox)", "bbox", "AP")),
    "cityscapes": (("AP (segm)", "segm", "AP"), ("AP50 (segm)", "segm", "AP50")),
}

# Detectron2's evaluator_type of a test dataset -> METRICS key (train_net records it in
# final_metrics.json as "metric"); a keypoint model on a "coco" dataset is "keypoints".
EVALUATOR_METRIC = {"pascal_voc": "voc", "coco": "coco", "lvis": "lvis", "cityscapes_instance": "cityscapes"}


def columns(metric):
    return tuple(c for c, _, _ in METRICS[metric])


def metric_values(metric, results):
    """{column: value} of one final_metrics.json 'results' dict, for the columns of `metric`."""
    out = {}
    for column, section, key in METRICS[metric]:
        values = results.get(section)
        if isinstance(values, dict) and key in values:
            out[column] = values[key]
    return out


# every name `--tasks` takes: these Detectron2 tasks and the classification transfer tasks on frozen
# or fine-tuned features (suite.contract.CLASSIFICATION_TASKS, slurm.pipeline.classification_stages)
TASK_NAMES = (*TASKS, *contract.CLASSIFICATION_TASKS)


def parse_task_list(values):
    """Task names from `--tasks a,b c` (commas or spaces); unknown names: ValueError naming them."""
    names = [n for v in values for n in v.split(",") if n]
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}: choose from {', '.join(TASK_NAMES)}")
    return list(dict.fromkeys(names))


def task_config(name, which="reference"):
    """The config of a task: its reference config or its synthetic twin."""
    task = TASKS[name]
    return task.config if which == "reference" else task.synthetic
