"""Backbones (timm Swin / ViT + a tuning method -> NCHW feature maps) and their pretrained weights."""

from ..adapters.io import count_parameters
from .backbone import BACKBONES, Backbone, BackboneSpec, build_backbone, build_backbone_from_adapter, checkpoint_units
from .pretrained import LoadReport, load_pretrained, read_checkpoint

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "LoadReport",
    "build_backbone",
    "build_backbone_from_adapter",
    "checkpoint_units",
    "count_parameters",
    "load_pretrained",
    "read_checkpoint",
]
