"""Backbones (timm Swin / ViT + a tuning method -> NCHW feature maps) and their pretrained weights."""

from ..adapters.io import count_parameters
from .backbone import (BACKBONES, Backbone, BackboneSpec, backbones, block_units, build_backbone,
                       build_backbone_from_adapter, checkpoint_units, compile_units)
from .layout import LAYOUTS, TrunkLayout, layout_of
from .names import backbone_spec, check_backbone_name
from .pretrained import LoadReport, load_pretrained, read_checkpoint

__all__ = [
    "BACKBONES",
    "LAYOUTS",
    "Backbone",
    "BackboneSpec",
    "TrunkLayout",
    "backbone_spec",
    "backbones",
    "block_units",
    "LoadReport",
    "build_backbone",
    "build_backbone_from_adapter",
    "check_backbone_name",
    "checkpoint_units",
    "compile_units",
    "count_parameters",
    "layout_of",
    "load_pretrained",
    "read_checkpoint",
]
