"""Mona: the multi-cognitive visual adapter (Yin et al., "5%>100%", CVPR 2025).

Official arithmetic, with the official state-dict names so that official weights load without renaming:

    x_n = norm(x) * gamma + x * gammax                   # scaled LayerNorm, gamma=1e-6, gammax=1 at init
    p   = project1(x_n)                                  # C -> 64
    y   = (conv1(p) + conv2(p) + conv3(p)) / 3 + p       # depthwise 3x3, 5x5, 7x7 on the (64, H, W) grid
    z   = y + projector(y)                               # 1x1 conv
    out = x + project2(dropout(gelu(z)))                 # 64 -> C, outer residual

Parameters per module: 133*C + 9728. Two per block, after each residual add (`post_attn`, `post_mlp` slots).

ViT prefix tokens (cls, registers) have no place on the grid, so they take the *linear path*: everything above
except the depthwise filters, i.e. y = p for them (the 1x1 projector, GELU, project2 still apply). Only the patch
tokens are reshaped to the grid and filtered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from .blocks import Recompute, iter_blocks, make_petl


class MonaOp(nn.Module):
    """The multi-cognitive filters ("adapter_conv"): averaged depthwise convs plus a 1x1 projector, both residual."""

    def __init__(self, dim: int = 64, kernels: tuple[int, ...] = (3, 5, 7)):
        super().__init__()
        self.kernels = tuple(kernels)
        for i, k in enumerate(self.kernels, start=1):
            if k % 2 == 0:
                raise ValueError(f"mona kernels must be odd, got {k}")
            self.add_module(f"conv{i}", nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim))
        self.projector = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, dim, H, W)
        convs = [getattr(self, f"conv{i}") for i in range(1, len(self.kernels) + 1)]
        y = sum(conv(x) for conv in convs) / len(convs) + x
        return y + self.projector(y)

    def linear_path(self, x: torch.Tensor) -> torch.Tensor:
        """What a token with no grid position gets: no spatial filter, the 1x1 projector only. x: (B, P, dim)."""
        z = self.projector(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return x + z


class Mona(nn.Module):
    """One Mona adapter on C channels.

    Args:
        in_dim: channels C of the stream it sits on.
        inner_dim: bottleneck width (64 at every stage in the paper).
        kernels: depthwise filter sizes (3, 5, 7).
        dropout: after GELU (0.1).
        residual: add the input back (the paper's placement). The E3VA-style highway uses residual=False: there the
            module reads a tap and its output is a delta added to the highway.
    """

    def __init__(
        self,
        in_dim: int,
        inner_dim: int = 64,
        kernels: tuple[int, ...] = (3, 5, 7),
        dropout: float = 0.1,
        residual: bool = True,
    ):
        super().__init__()
        self.residual = residual
        self.recompute: Recompute | None = None  # set: keep only project1's output for backward (lora_fa)
        self.project1 = nn.Linear(in_dim, inner_dim)
        self.project2 = nn.Linear(inner_dim, in_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.adapter_conv = MonaOp(inner_dim, kernels)
        self.norm = nn.LayerNorm(in_dim)
        self.gamma = nn.Parameter(torch.full((in_dim,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(in_dim))
        for lin in (self.project1, self.project2):
            trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(
        self, x: torch.Tensor, hw: tuple[int, int] | None = None, num_prefix_tokens: int = 0
    ) -> torch.Tensor:
        """x: (B, H, W, C) grid, or (B, P+N, C) tokens with `hw` = (H, W) of the N patch tokens."""
        p = self.project1(self.norm(x) * self.gamma + x * self.gammax)
        if self.recompute is None:
            out = self._filter(p, hw, num_prefix_tokens)
        else:
            out = self.recompute(self._filter, p, hw, num_prefix_tokens)
        return x + out if self.residual else out

    def _filter(self, p: torch.Tensor, hw: tuple[int, int] | None, num_prefix_tokens: int) -> torch.Tensor:
        """Everything after project1: the multi-cognitive filters, GELU, dropout, project2."""
        if p.dim() == 4:
            z = self.adapter_conv(p.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            if hw is None:
                raise ValueError("Mona on (B, N, C) tokens needs hw=(H, W)")
            B, N, D = p.shape
            P = num_prefix_tokens
            h, w = hw
            if N - P != h * w:
                raise ValueError(f"Mona got {N - P} patch tokens for a {h}x{w} grid")
            grid = p[:, P:].transpose(1, 2).reshape(B, D, h, w)
            z = self.adapter_conv(grid).flatten(2).transpose(1, 2)
            if P:
                z = torch.cat([self.adapter_conv.linear_path(p[:, :P]), z], dim=1)
        return self.project2(self.dropout(F.gelu(z)))


def apply_mona(trunk: nn.Module, inner_dim: int = 64, kernels: tuple[int, ...] = (3, 5, 7), dropout: float = 0.1):
    """Two Monas per block, after each residual add; only they train."""
    for _, blk, dim in iter_blocks(trunk):
        make_petl(trunk, blk)
        blk.post_attn = Mona(dim, inner_dim, tuple(kernels), dropout)
        blk.post_mlp = Mona(dim, inner_dim, tuple(kernels), dropout)
