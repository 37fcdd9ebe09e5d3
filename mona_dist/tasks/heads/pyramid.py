"""Simple feature pyramid: four stride-16 ViT maps -> strides 4/8/16/32 for UperNet or an FPN.

As in ViTDet / mmseg's BEiT-UperNet: ×4 by two stride-2 transposed convs (LayerNorm2d + GELU between), ×2 by
one, identity, and ×½ by 2×2 max-pool. Channels stay as they are, so a plain ViT's `out_channels` carry over.
LayerNorm2d (as in ViTDet) rather than BatchNorm keeps it independent of the per-rank batch size.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn


def _up4(c: int) -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(c, c, 2, stride=2), LayerNorm2d(c), nn.GELU(), nn.ConvTranspose2d(c, c, 2, stride=2)
    )


class SimpleFeaturePyramid(nn.Module):
    """Rescale 4 same-stride maps by ×4, ×2, ×1, ×½ (in that order)."""

    def __init__(self, in_channels: list[int], in_stride: int = 16):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"SimpleFeaturePyramid takes 4 maps, got in_channels={in_channels}")
        c0, c1, _, _ = in_channels
        self.ops = nn.ModuleList([_up4(c0), nn.ConvTranspose2d(c1, c1, 2, stride=2), nn.Identity(), nn.MaxPool2d(2)])
        self.out_channels = list(in_channels)
        self.out_strides = [in_stride // 4, in_stride // 2, in_stride, in_stride * 2]

    def forward(self, feats: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if len(feats) != 4:
            raise ValueError(f"SimpleFeaturePyramid takes 4 maps, got {len(feats)}")
        return [op(f) for op, f in zip(self.ops, feats)]


def needs_pyramid(out_strides: list[int]) -> bool:
    """True for a backbone whose outputs all share one stride (ViT), which a pyramid head cannot use as is."""
    return len(set(out_strides)) == 1
