"""Res5ROIHeadsExtraNorm: the C4 head of the MoCo detection protocol (an extra norm after res5).
For ResNet-18/34 backbones res5 is built from BasicBlocks, so converted R18 weights load whole."""
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads with one more norm layer (cfg.MODEL.RESNETS.NORM) after the res5 stage, as
    in the MoCo paper's detection protocol (He et al. 2020, appendix). The norm is new: it is
    trained from scratch, every other res5 tensor comes from the converted backbone."""

    @classmethod
    def _build_res5_block(cls, cfg):
        if cfg.MODEL.RESNETS.DEPTH in (18, 34):
            seq, out_channels = cls._build_basic_res5_block(cfg)
        else:
            seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels

    @classmethod
    def _build_basic_res5_block(cls, cfg):
        """res5 of torchvision's resnet18/34 (2/3 BasicBlocks, 256 -> 512 channels, stride 2)."""
        out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
        num_blocks = {18: 2, 34: 3}[cfg.MODEL.RESNETS.DEPTH]
        blocks = ResNet.make_stage(
            BasicBlock,
            num_blocks,
            stride_per_block=[2] + [1] * (num_blocks - 1),
            in_channels=out_channels // 2,
            out_channels=out_channels,
            norm=cfg.MODEL.RESNETS.NORM,
        )
        return nn.Sequential(*blocks), out_channels
