"""Detectron2 side of the suite: the MoCo-protocol ROI head, dataset registration, train_net.
Importing the package registers the head; `transfer.datasets.register_shapes()` the synthetic
corpus (VOC and COCO are Detectron2's builtins)."""
from . import roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
