"""SANE / MoCo v2 self-supervised pretraining (arXiv 2106.14749).

Run `python -m pretrain --config configs/pretrain/NAME.yaml [key=value ...]`.
"""
