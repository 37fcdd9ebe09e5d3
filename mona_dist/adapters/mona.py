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

How it is computed (neither changes a parameter, a name or a number beyond fp32 rounding; tests/adapters):
- `fused=True`: the three filters and the identity are one linear map, so they run as one 7x7 depthwise conv
  whose kernel `(pad(W3) + pad(W5) + W7) / 3 + delta` and bias (the mean) are built from the three official
  parameters in every forward (their gradients flow through the merge); `y + projector(y)` is one 1x1 conv with
  weight `I + W`; the scaled norm's sum is one `addcmul`. `fused=False`: the official ops one by one.
- `recompute="input"`: autograd keeps only Mona's input; the scaled norm, the projections, the filters and GELU
  are recomputed in backward (non-reentrant checkpoint: parameters get gradients behind a frozen stem, under
  activation checkpointing and under every engine; the RNG state is restored, so dropout draws the same mask).
  Inside a block that activation checkpointing wraps, the block's checkpoint recomputes Mona and Mona's own is off
  (`Recompute.enabled`): nested, it would keep its input alive beside the block's.
  "project1" keeps project1's 64-wide output instead and recomputes what follows it (mona_hw's lora_fa, where
  project1 is frozen and reads a no-grad tap); None keeps what autograd keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from .blocks import Recompute, iter_blocks, make_petl

RECOMPUTE_FROM = ("input", "project1")


class MonaOp(nn.Module):
    """The multi-cognitive filters ("adapter_conv"): averaged depthwise convs plus a 1x1 projector, both residual.
    `fused` (a setting, not state): one merged depthwise conv and one 1x1 conv (module docstring)."""

    def __init__(self, dim: int = 64, kernels: tuple[int, ...] = (3, 5, 7), fused: bool = True):
        super().__init__()
        self.kernels = tuple(kernels)
        self.fused = fused
        for i, k in enumerate(self.kernels, start=1):
            if k % 2 == 0:
                raise ValueError(f"mona kernels must be odd, got {k}")
            self.add_module(f"conv{i}", nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim))
        self.projector = nn.Conv2d(dim, dim, 1)

    def _convs(self) -> list[nn.Conv2d]:
        return [getattr(self, f"conv{i}") for i in range(1, len(self.kernels) + 1)]

    def merged_filter(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the one depthwise conv equal to `mean(conv_i(p)) + p`: the kernels zero-padded to the
        largest, averaged, plus 1 at the centre tap. Built in fp32 (under a bf16/fp16 weight policy the identity
        tap would otherwise round the small kernel values off), returned in the weights' dtype."""
        convs = self._convs()
        k, dtype = max(self.kernels), convs[0].weight.dtype
        acc = torch.promote_types(dtype, torch.float32)
        # stack/mean and an out-of-place delta: torch 2.14's inductor fails to partition a recomputed region built
        # with Python's sum() ("Node add_N was invalid, but is output"; tests/engine/test_fsdp.py compiles it)
        w = torch.stack([F.pad(c.weight.to(acc), [(k - c.kernel_size[0]) // 2] * 4) for c in convs]).mean(0)
        w = w + F.pad(torch.ones(1, 1, 1, 1, dtype=acc, device=w.device), [k // 2] * 4)
        b = torch.stack([c.bias.to(acc) for c in convs]).mean(0)
        return w.to(dtype), b.to(dtype)

    def projector_with_identity(self) -> torch.Tensor:
        """The 1x1 weight of `y + projector(y)`: I + W, (dim, dim, 1, 1)."""
        w = self.projector.weight
        return w + torch.eye(w.shape[0], dtype=w.dtype, device=w.device).view_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, dim, H, W)
        if self.fused:
            w, b = self.merged_filter()
            y = F.conv2d(x, w, b, padding=w.shape[-1] // 2, groups=w.shape[0])
            return F.conv2d(y, self.projector_with_identity(), self.projector.bias)
        convs = self._convs()
        y = sum(conv(x) for conv in convs) / len(convs) + x
        return y + self.projector(y)

    def linear_path(self, x: torch.Tensor) -> torch.Tensor:
        """What a token with no grid position gets: no spatial filter, the 1x1 projector only. x: (B, P, dim)."""
        if self.fused:
            return F.linear(x, self.projector_with_identity().flatten(1), self.projector.bias)
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
        recompute: what autograd keeps for backward: "input" (the default), "project1" or None (module docstring).
        fused: one merged depthwise conv and one 1x1 conv (the default), or the official ops one by one.
    """

    def __init__(
        self,
        in_dim: int,
        inner_dim: int = 64,
        kernels: tuple[int, ...] = (3, 5, 7),
        dropout: float = 0.1,
        residual: bool = True,
        recompute: str | None = "input",
        fused: bool = True,
    ):
        super().__init__()
        if recompute not in (None, *RECOMPUTE_FROM):
            raise ValueError(f"mona recompute must be one of {RECOMPUTE_FROM} or None, got {recompute!r}")
        self.residual = residual
        self.recompute_from = recompute
        self.project1 = nn.Linear(in_dim, inner_dim)
        self.project2 = nn.Linear(inner_dim, in_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.adapter_conv = MonaOp(inner_dim, kernels, fused)
        self.norm = nn.LayerNorm(in_dim)
        self.gamma = nn.Parameter(torch.full((in_dim,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(in_dim))
        # A module, so that the bench sees what it keeps (its tensor arguments); no parameters, no state.
        self.recompute = Recompute() if recompute else None
        for lin in (self.project1, self.project2):
            trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(
        self, x: torch.Tensor, hw: tuple[int, int] | None = None, num_prefix_tokens: int = 0
    ) -> torch.Tensor:
        """x: (B, H, W, C) grid, or (B, P+N, C) tokens with `hw` = (H, W) of the N patch tokens."""
        if self.recompute_from == "input" and torch.is_grad_enabled():
            out = self.recompute(self._delta, x, hw, num_prefix_tokens)
        else:
            out = self._delta(x, hw, num_prefix_tokens)
        return x + out if self.residual else out

    def _delta(self, x: torch.Tensor, hw: tuple[int, int] | None, num_prefix_tokens: int) -> torch.Tensor:
        """Everything but the outer residual."""
        if self.adapter_conv.fused:
            xn = torch.addcmul(self.norm(x) * self.gamma, x, self.gammax)
        else:
            xn = self.norm(x) * self.gamma + x * self.gammax
        p = self.project1(xn)
        if self.recompute_from == "project1" and torch.is_grad_enabled():
            return self.recompute(self._filter, p, hw, num_prefix_tokens)
        return self._filter(p, hw, num_prefix_tokens)

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


def apply_mona(
    trunk: nn.Module,
    inner_dim: int = 64,
    kernels: tuple[int, ...] = (3, 5, 7),
    dropout: float = 0.1,
    recompute: bool = True,
    fused: bool = True,
):
    """Two Monas per block, after each residual add; only they train. `recompute`: keep only each Mona's input for
    backward; `fused`: one merged depthwise conv (Mona's module docstring). Both change no number but rounding."""
    for _, blk, dim in iter_blocks(trunk):
        make_petl(trunk, blk)
        for slot in ("post_attn", "post_mlp"):
            setattr(blk, slot, Mona(dim, inner_dim, tuple(kernels), dropout,
                                    recompute="input" if recompute else None, fused=fused))
