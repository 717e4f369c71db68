"""The evaluations of pretraining snapshots (OUT/checkpoint_evals/<unit>/epoch<NNNN>/, written by the
pipeline's checkpoint evaluation stages) as points (backbone, seed, epoch, metric, value), for the
metric-against-epoch plot; the results table leaves them out."""
import os
from dataclasses import dataclass
from pathlib import Path

from suite import contract
from suite.results import _finite, columns_for, detection_metrics, read_json


@dataclass(frozen=True)
class Point:
    backbone: str
    seed: "int | None"   # the pretraining seed (None: one pretraining)
    epoch: int
    metric: str          # "kNN top-1", "linear top-1", "VOC07 cls mAP", "<task> AP50", ...
    value: float


def probe_points(lm):
    """(metric, value) of a linear_metrics.json: its kNN top-1 and its linear top-1 (VOC07: mAP)."""
    column, value = ("VOC07 cls mAP", lm.get("mAP")) if lm.get("preset") == "voc07" else ("linear top-1", lm.get("top1"))
    return [(m, float(v)) for m, v in (("kNN top-1", lm.get("knn_top1")), (column, value)) if _finite(v)]


def fine_tune_points(fm):
    """(metric, value) of a final_metrics.json: the table's columns of its task, prefixed by the task."""
    results = fm.get("results") if isinstance(fm.get("results"), dict) else {}
    task, metric = str(fm.get("task", "?")), str(fm.get("metric") or "")  # the metric as the table reads it
    metrics = detection_metrics(results, metric)
    return [(f"{task} {c}", float(metrics[c])) for c in columns_for("detection", task, metric=metric)
            if _finite(metrics.get(c))]


def collect(paths):
    """Every checkpoint evaluation under `paths` (roots searched recursively), ordered by backbone,
    metric and epoch; unreadable files are skipped (the stage that wrote them failed)."""
    points = []
    readers = {contract.PROBE_METRICS: probe_points, contract.FINE_TUNE_DONE: fine_tune_points}
    for root in paths:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            where = contract.checkpoint_eval(Path(dirpath).resolve())
            for name in set(filenames) & set(readers) if where else ():
                try:
                    pairs = readers[name](read_json(Path(dirpath) / name))
                except (OSError, ValueError, AttributeError):
                    continue
                points += [Point(*where, metric, value) for metric, value in pairs]
    return sorted(set(points), key=lambda p: (p.backbone, p.metric, p.epoch, p.seed if p.seed is not None else -1))
