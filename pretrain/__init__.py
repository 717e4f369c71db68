"""SANE / MoCo v2 self-supervised pretraining (arXiv 2106.14749), its probes (pretrain.linear), the
converter to Detectron2 weights (pretrain.convert) and the throughput benchmark; torch, torchvision,
numpy, PyYAML and tqdm only (no Detectron2, no Submitit).

Run `python -m pretrain --config configs/pretrain/NAME.yaml [key=value ...]`.
"""
