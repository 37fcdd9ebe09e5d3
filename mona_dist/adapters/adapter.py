"""Houlsby-style bottleneck Adapter, placed as the Mona paper ran it: on the attention output and on the MLP
output, each before its residual add (`attn_adapter`, `mlp_adapter` slots).

    adapter(y) = y + up(dropout(gelu(down(y))))        # C -> 64 -> C, internal skip

Parameters per module: 129*C + 64; two per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from .blocks import iter_blocks, make_petl


class Adapter(nn.Module):
    """Bottleneck adapter. `skip=False, scale=0.1` is AdaptFormer's parallel variant.

    Init: down trunc_normal(0.02), up zeros, so the module starts as the identity (skip) or as zero (no skip).
    Token-wise, so it takes any (..., C) layout; grid arguments from ViT blocks are accepted and ignored.
    """

    def __init__(self, dim: int, hidden: int = 64, dropout: float = 0.1, skip: bool = True, scale: float = 1.0):
        super().__init__()
        self.skip = skip
        self.scale = scale
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        trunc_normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, **_) -> torch.Tensor:
        y = self.up(self.dropout(F.gelu(self.down(x)))) * self.scale
        return x + y if self.skip else y


def apply_adapter(trunk: nn.Module, hidden: int = 64, dropout: float = 0.1):
    for _, blk, dim in iter_blocks(trunk):
        make_petl(trunk, blk)
        blk.attn_adapter = Adapter(dim, hidden, dropout)
        blk.mlp_adapter = Adapter(dim, hidden, dropout)
