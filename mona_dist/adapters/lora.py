"""LoRA (Hu et al., ICLR 2022) on the fused qkv projection, q and v only, as the Mona paper ran it:
r = 64, alpha = 1 (scale alpha/r = 1/64), A kaiming-uniform, B zeros.

    q = W_q x + (1/64) B_q A_q x,   k = W_k x,   v = W_v x + (1/64) B_v A_v x

The qkv `nn.Linear` keeps its weight and bias (pretrained keys unchanged); its class becomes `LoRAQKVLinear`.
Parameters per block: 4 * r * C.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import iter_blocks


class LoRAQKVLinear(nn.Linear):
    """A fused qkv Linear with low-rank updates on its q and v thirds."""

    def add_lora(self, rank: int, alpha: float) -> None:
        d = self.out_features // 3
        self.rank, self.scaling = rank, alpha / rank
        for name in ("q", "v"):
            a = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            setattr(self, f"lora_A_{name}", a)
            setattr(self, f"lora_B_{name}", nn.Parameter(torch.zeros(d, rank, device=self.weight.device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.weight, self.bias).chunk(3, dim=-1)
        q = q + F.linear(F.linear(x, self.lora_A_q), self.lora_B_q) * self.scaling
        v = v + F.linear(F.linear(x, self.lora_A_v), self.lora_B_v) * self.scaling
        return torch.cat([q, k, v], dim=-1)


def apply_lora(trunk: nn.Module, rank: int = 64, alpha: float = 1.0):
    for _, blk, _ in iter_blocks(trunk):
        qkv = blk.attn.qkv
        if type(qkv) is not nn.Linear or qkv.out_features % 3:
            raise ValueError(f"lora expects a fused qkv nn.Linear, found {type(qkv).__name__}")
        qkv.__class__ = LoRAQKVLinear
        qkv.add_lora(rank, alpha)
