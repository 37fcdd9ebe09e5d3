"""LoRand (Yin et al., CVPR 2023): a bottleneck adapter whose two projections are themselves low-rank.

    W = sum over k branches of A_k G_k B_k,   A_k (in x r), G_k (r x r), B_k (r x out)
    lorand(y) = y + up(gelu(down(y)))          # down C -> C/2, up C/2 -> C, each a LowRankLinear (+ bias)

Placed like Adapter (attention output and MLP output, before the residual adds). Paper default: 4 branches, r = 8,
every factor kaiming-uniform. The E3VA highway reuses `LowRankLinear` with 2 branches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Recompute, iter_blocks, make_petl


class LowRankLinear(nn.Module):
    """y = x W + b with W = sum_k A_k G_k B_k, applied factor by factor.

    Applying the factors in turn (x A, then G, then B) never forms the (in x out) matrix and keeps only (..., k*r)
    intermediates for backward. If A is frozen and x needs no grad (a tap from a frozen backbone), x is not kept
    at all: that is the LoRA-FA trick the highway's `lora_fa` option uses.
    """

    def __init__(self, in_features: int, out_features: int, branches: int = 4, rank: int = 8, bias: bool = True):
        super().__init__()
        self.A = nn.Parameter(torch.empty(branches, in_features, rank))
        self.G = nn.Parameter(torch.empty(branches, rank, rank))
        self.B = nn.Parameter(torch.empty(branches, rank, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        for factor in (self.A, self.G, self.B):
            for w in factor:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x A for every branch: (..., in) -> (..., k, r)."""
        k, i, r = self.A.shape
        return (x @ self.A.transpose(0, 1).reshape(i, k * r)).unflatten(-1, (k, r))

    def finish(self, p: torch.Tensor) -> torch.Tensor:
        """(x A) G B + b, summed over branches: (..., k, r) -> (..., out)."""
        k, r, _ = self.B.shape
        q = torch.einsum("...kr,krs->...ks", p, self.G)
        y = q.flatten(-2) @ self.B.reshape(k * r, -1)  # sum over branches and ranks at once
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.project(x))


class LoRand(nn.Module):
    """LoRand adapter on C channels: C -> hidden -> C through LowRankLinears, GELU between, optional skip.

    With `recompute` set to a `Recompute` module, only the rank-wide projection x A is kept for backward and the
    rest of the adapter is recomputed from it (the highway's lora_fa mode, where A is frozen and x a no-grad tap).
    """

    def __init__(
        self, dim: int, hidden: int | None = None, branches: int = 4, rank: int = 8, skip: bool = True
    ):
        super().__init__()
        hidden = hidden or dim // 2
        self.skip = skip
        self.recompute: Recompute | None = None
        self.down = LowRankLinear(dim, hidden, branches, rank)
        self.up = LowRankLinear(hidden, dim, branches, rank)

    def _rest(self, p: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down.finish(p)))

    def forward(self, x: torch.Tensor, **_) -> torch.Tensor:
        p = self.down.project(x)
        y = self._rest(p) if self.recompute is None else self.recompute(self._rest, p)
        return x + y if self.skip else y


def apply_lorand(trunk: nn.Module, branches: int = 4, rank: int = 8):
    for _, blk, dim in iter_blocks(trunk):
        make_petl(trunk, blk)
        blk.attn_adapter = LoRand(dim, branches=branches, rank=rank)
        blk.mlp_adapter = LoRand(dim, branches=branches, rank=rank)
