"""A mona_dist Backbone as a torchvision detection backbone: selected maps -> FPN -> OrderedDict.

torchvision's detectors want `backbone.out_channels` (one int) and `backbone(images)` returning an OrderedDict
of same-width maps, finest first. `BackboneWithFPN` in torchvision assumes an `IntermediateLayerGetter` over a
CNN, so this is the same thing for a module that already returns a list of NCHW maps.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from .pyramid import SimpleFeaturePyramid, needs_pyramid


class FPNBackbone(nn.Module):
    """`body` (a mona_dist Backbone) + a simple pyramid for single-stride ViTs + a torchvision FPN.

    `levels` picks which of the (pyramid's) maps feed the FPN, e.g. (0, 1, 2, 3) for Mask R-CNN (P2-P5) or
    (1, 2, 3) for RetinaNet (P3-P5). `extra` adds the coarser levels (LastLevelMaxPool, LastLevelP6P7).
    """

    def __init__(
        self,
        body: nn.Module,
        levels: tuple[int, ...],
        out_channels: int = 256,
        extra: ExtraFPNBlock | None = None,
    ):
        super().__init__()
        self.body = body
        channels, strides = list(body.out_channels), list(body.out_strides)
        self.pyramid = None
        if needs_pyramid(strides) and len(strides) == 4:
            self.pyramid = SimpleFeaturePyramid(channels, strides[0])
            channels, strides = self.pyramid.out_channels, self.pyramid.out_strides
        if not levels or max(levels) >= len(channels) or list(levels) != sorted(set(levels)):
            raise ValueError(f"FPN levels must be increasing indices below {len(channels)}, got {list(levels)}")
        self.levels = tuple(levels)
        self.fpn = FeaturePyramidNetwork([channels[i] for i in levels], out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.strides = [strides[i] for i in levels]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(images)
        if self.pyramid is not None:
            feats = self.pyramid(feats)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.levels)))
