"""E3VA's gradient highway (Yin et al., "Parameter-efficient is not sufficient", NeurIPS 2023) and mona_hw.

The frozen backbone runs under `torch.no_grad()`, so autograd keeps none of its activations and backward never
enters it. Beside it runs a highway stream `h`, which alone carries gradients:

    for every block:   x, a, m = block(x)                         (no grad; a, m = attention / MLP branch outputs)
                       h = h + adapter_a(a) + adapter_m(m)         (adapters in parallel, each reads one tap)
    between stages:    h = merge(h)                                (the highway's own 2x2 patch merging)
    at an out stage:   out = out_norm(x + h)                       (trainable norms feed the neck)

Design choices the paper leaves open, and what we chose:
- Taps are the branch outputs *before* drop-path and the residual add, one pair per block (Swin and ViT alike),
  computed in the blocks' own Swin arithmetic (official in a Backbone; blocks.py).
- E3VA adapter ("dual low-rank"): LoRand's bottleneck C -> C/2 -> C with GELU, no internal skip (its input is a
  tap, not the stream), each projection a sum of 2 branches of rank-8 factors. That is 49.5*C + 256 parameters per
  adapter: 1,207,296 trainable on Swin-B and 1,804,800 on Swin-L with the output norms (V-PETL lists 1.20 M and
  1.79 M).
- The last factor of each up-projection starts at zero, so `h` is exactly zero at step 0 and every output equals
  out_norm(frozen backbone feature): training starts from the pretrained features, not from noise.
- Highway merging between stages is the backbone's PatchMerging *without* its LayerNorm: the 2x2 concat and the
  4C -> 2C reduction. Normalising the small delta `h` would turn it into unit-variance noise (and map 0 to the
  LayerNorm bias). Frozen by default, and then it *is* the backbone's reduction (called, not copied: no extra
  memory); `train_downsample=True` gives the highway trainable copies (~2.8 M more parameters on Swin-B).
- ViT: one scale, no merging; outputs are taken at the requested blocks (4 evenly spaced by default).
- mona_hw (ours): the same highway with Mona modules as the adapters (residual=False: the module's output is the
  delta), project2 zero-initialised for the same reason as above. Its point is E3VA's memory with Mona's
  filters, so it defaults to lora_fa=True (below): the filters, projector and project2 train, the scaled norm and
  project1 stay frozen. `lora_fa=False` trains the whole Mona and keeps the taps.
- `lora_fa=True` (ours, after LoRA-FA): freeze the first projection that reads each tap (E3VA: the down factor A;
  mona_hw: scaled norm + project1), and recompute the rest of each adapter in backward from that projection. A
  frozen projection of a no-grad tap needs nothing kept for backward, so neither the C-wide taps nor the adapters'
  C/2-wide hidden layers (together nearly all of a naive highway's activations) are saved: only the rank-wide
  (E3VA: 2 x 8) or 64-wide (mona_hw) projections are.
- mona_hw with `lora_fa=False` keeps only each Mona's tap and recomputes the rest (`recompute=True`, as `mona`);
  `fused` is Mona's (adapters/mona.py). Under lora_fa, `recompute` changes nothing: it recomputes already.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from timm.models.swin_transformer import PatchMerging, SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .blocks import Recompute, family, iter_blocks, make_petl
from .lorand import LoRand
from .mona import Mona


def merge_2x2(h: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/2, W/2, 4C), padding odd sizes, in the channel order of timm's PatchMerging."""
    B, H, W, C = h.shape
    h = nn.functional.pad(h, (0, 0, 0, W % 2, 0, H % 2))
    _, H, W, _ = h.shape
    return h.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)


def _copy_reduction(pm: PatchMerging) -> nn.Linear:
    lin = nn.Linear(pm.reduction.in_features, pm.reduction.out_features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(pm.reduction.weight)
    return lin


class Highway(nn.Module):
    """Adapters, merges and the forward that runs a frozen trunk beside them. Holds no reference to the trunk."""

    def __init__(
        self,
        trunk: nn.Module,
        make_adapter: Callable[[int], nn.Module],
        out_indices: tuple[int, ...],
        lora_fa: bool = False,
        train_downsample: bool = False,
    ):
        super().__init__()
        self.family = family(trunk)
        self.out_indices = tuple(out_indices)
        self.lora_fa = lora_fa
        dims = [dim for _, _, dim in iter_blocks(trunk)]
        self.attn_adapters = nn.ModuleList(make_adapter(d) for d in dims)
        self.mlp_adapters = nn.ModuleList(make_adapter(d) for d in dims)
        # Trainable copies of the backbone's reductions, or None: then the backbone's own (frozen) ones are used.
        self.merges = None
        if self.family == "swin" and train_downsample:
            self.merges = nn.ModuleList(
                _copy_reduction(st.downsample) if isinstance(st.downsample, PatchMerging) else nn.Identity()
                for st in trunk.layers
            )

    @torch.no_grad()
    def copy_merges_from(self, trunk: nn.Module) -> None:
        """Re-copy trainable merges from the trunk (after pretrained weights were loaded into it)."""
        for merge, stage in zip(self.merges or (), trunk.layers):
            if isinstance(merge, nn.Linear):
                merge.weight.copy_(stage.downsample.reduction.weight)

    def checkpoint_units(self) -> list[tuple[nn.Module, str]]:
        """Adapters worth recomputing in backward: those that do not recompute themselves (lora_fa ones from their
        rank-wide projection, where an outer checkpoint would keep the C-wide tap alive instead; mona_hw's Monas
        from their tap)."""
        return [(mods, str(i)) for mods in (self.attn_adapters, self.mlp_adapters) for i in range(len(mods))
                if getattr(mods[i], "recompute", None) is None]

    def _add(self, h: torch.Tensor | None, k: int, a: torch.Tensor, m: torch.Tensor, **kw) -> torch.Tensor:
        d = self.attn_adapters[k](a, **kw) + self.mlp_adapters[k](m, **kw)
        return d if h is None else h + d

    def forward(self, trunk: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """x + h at each out index: (B, H, W, C) per Swin stage, (B, P+N, C) tokens per ViT block."""
        outs, h, k = [], None, 0
        with torch.no_grad():
            x = trunk.patch_embed(images)
            if self.family == "vit":  # tokens carry no shape: Mona adapters need the grid and the prefix count
                hw = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(trunk.patch_embed.grid_size)
                grid = {"hw": hw, "num_prefix_tokens": trunk.num_prefix_tokens}
                x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(x)))
        if self.family == "swin":
            for s, stage in enumerate(trunk.layers):
                with torch.no_grad():
                    x = stage.downsample(x)
                if h is not None and isinstance(stage.downsample, PatchMerging):
                    reduction = stage.downsample.reduction if self.merges is None else self.merges[s]
                    h = reduction(merge_2x2(h))
                for blk in stage.blocks:
                    with torch.no_grad():
                        x, a, m = blk.taps(x)
                    h, k = self._add(h, k, a, m), k + 1
                if s in self.out_indices:
                    outs.append(x + h)
        else:
            for i, blk in enumerate(trunk.blocks):
                with torch.no_grad():
                    x, a, m = blk.taps(x)
                h = self._add(h, i, a, m, **grid)
                if i in self.out_indices:
                    outs.append(x + h)
        return outs


def _e3va_adapter(dim: int, rank: int, branches: int, hidden_ratio: float, lora_fa: bool) -> nn.Module:
    ad = LoRand(dim, hidden=int(dim * hidden_ratio), branches=branches, rank=rank, skip=False)
    nn.init.zeros_(ad.up.G)
    ad.down.A.requires_grad_(not lora_fa)
    ad.recompute = Recompute() if lora_fa else None
    return ad


def _mona_adapter(dim: int, inner_dim: int, kernels, dropout: float, lora_fa: bool, recompute: bool,
                  fused: bool) -> nn.Module:
    # lora_fa keeps project1's output (frozen, of a no-grad tap); otherwise the tap itself, or everything
    keep = "project1" if lora_fa else "input" if recompute else None
    ad = Mona(dim, inner_dim, tuple(kernels), dropout, residual=False, recompute=keep, fused=fused)
    nn.init.zeros_(ad.project2.weight)
    for frozen in (ad.norm.weight, ad.norm.bias, ad.gamma, ad.gammax, ad.project1.weight, ad.project1.bias):
        frozen.requires_grad_(not lora_fa)
    return ad


class HighwaySwinTransformer(SwinTransformer):
    """A user's timm Swin with a highway: forward_features returns norm(x + h) of the last stage."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.highway(self, x)[-1])


class HighwayVisionTransformer(VisionTransformer):
    """A user's timm ViT with a highway: forward_features returns norm(x + h) after the last block."""

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the E3VA highway runs ViT blocks without attention masks")
        return self.norm(self.highway(self, x)[-1])


def _attach(model: nn.Module, make_adapter, lora_fa: bool, train_downsample: bool) -> None:
    trunk = getattr(model, "trunk", model)
    if hasattr(model, "out_norms"):  # a mona_dist Backbone: its output norms are the trainable norms
        out_indices, norms = model.out_indices, model.out_norms
    else:  # a plain timm model: the highway feeds its final norm
        out_indices = (len(trunk.layers) - 1,) if family(trunk) == "swin" else (len(trunk.blocks) - 1,)
        norms = trunk.norm
        trunk.__class__ = HighwaySwinTransformer if family(trunk) == "swin" else HighwayVisionTransformer
    model.highway = Highway(trunk, make_adapter, out_indices, lora_fa, train_downsample)
    for _, blk, _ in iter_blocks(trunk):
        make_petl(trunk, blk)  # the highway reads `blk.taps` (a ViT's blocks are still timm's own here)
    norms.requires_grad_(True)


def apply_e3va(
    model: nn.Module,
    rank: int = 8,
    branches: int = 2,
    hidden_ratio: float = 0.5,
    lora_fa: bool = False,
    train_downsample: bool = False,
) -> None:
    _attach(model, lambda d: _e3va_adapter(d, rank, branches, hidden_ratio, lora_fa), lora_fa, train_downsample)


def apply_mona_hw(
    model: nn.Module,
    inner_dim: int = 64,
    kernels: tuple[int, ...] = (3, 5, 7),
    dropout: float = 0.1,
    lora_fa: bool = True,
    train_downsample: bool = False,
    recompute: bool = True,
    fused: bool = True,
) -> None:
    _attach(model, lambda d: _mona_adapter(d, inner_dim, kernels, dropout, lora_fa, recompute, fused),
            lora_fa, train_downsample)
