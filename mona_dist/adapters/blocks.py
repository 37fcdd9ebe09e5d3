"""Where adapters sit inside a timm Swin or ViT block.

A method never edits timm's code. It turns a block into a `PetlSwinBlock` / `PetlViTBlock` (the same object,
its class swapped, so every pretrained state-dict key stays where it was) and fills one or more *slots*:

    a = attn(norm1(x));  a = attn_adapter(a)          # Adapter, LoRand: on the branch output
    x = x + drop_path(a);  x = post_attn(x)           # Mona: on the stream, after the residual add
    m = mlp(norm2(x));     m = mlp_adapter(m)
    x = x + drop_path(m) + mlp_parallel(x_in)         # AdaptFormer: beside the MLP, fed the post-attention stream
    x = post_mlp(x)                                   # Mona

An empty slot costs nothing. `block.taps(x)` (`swin_block_taps` / `vit_block_taps`) runs an untouched block and
also returns its two branch outputs, which is what the E3VA highway reads. It is a method of the block so that a
sharding engine can wrap it like the forward: FSDP2 unshards a block's weights only around calls it knows
(`register_fsdp_forward_method(block, "taps")`).

Swin window arithmetic (`set_swin_arithmetic`): timm and the official Swin code (Microsoft's detection and
segmentation Swin, which the official Mona code copies) differ on dense inputs. "official" pads the map
(bottom/right, to a multiple of the window), then rolls by -window//2 on every odd block whatever the map size,
masks the shifted regions of the padded map, rolls back, then crops. "timm" rolls, then pads, and drops the shift
in a stage whose build-time resolution is not larger than the window. Both run timm's own WindowAttention, so the
weights and their keys are the same.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from timm.models.vision_transformer import Block as ViTBlock
from timm.models.vision_transformer import VisionTransformer

SLOTS = ("attn_adapter", "post_attn", "mlp_adapter", "mlp_parallel", "post_mlp")
SWIN_ARITHMETICS = ("official", "timm")


class GridState:
    """The patch grid (h, w) of the current forward, shared by a ViT's blocks (tokens carry no shape)."""

    def __init__(self, hw: tuple[int, int]):
        self.hw = tuple(hw)


class Recompute(nn.Module):
    """`recompute(fn, x, *args)` runs fn now and keeps only its tensor arguments for backward, recomputing the rest
    there (non-reentrant checkpoint, so parameters used inside still get gradients behind a frozen stem).

    A module rather than a function so that what it keeps is visible to a forward pre-hook: the bench counts those
    arguments as saved activations. It has no parameters and adds nothing to a state dict.

    `enabled = False` runs fn as it is: set by activation checkpointing on the Recompute modules inside a unit it
    wraps, whose own checkpoint recomputes them already (nested, each would keep its arguments alive beside the
    unit's input until backward).
    """

    enabled = True

    def forward(self, fn, *args):
        if not self.enabled:
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)


def _fill(slot: nn.Module | None, x: torch.Tensor, **kw) -> torch.Tensor:
    return x if slot is None else slot(x, **kw)


class PetlSwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock with adapter slots. Tokens stay (B, H, W, C), the layout Mona's convs want.

    `swin_arithmetic` picks how windows are cut (module docstring); the class default keeps a user's own timm model
    as timm computes it, a Backbone sets it per block.
    """

    swin_arithmetic = "timm"

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        if self.swin_arithmetic == "timm":
            return super()._attn(x)
        B, H, W, C = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
        _, Hp, Wp, _ = x.shape
        mask = None
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
            # The padded map's shift mask (the regions are cut from its bottom/right edge): timm's own builder,
            # called on the padded map, is the official mask. Its -100 becomes -inf: the same softmax in fp32
            # (exp(-100) is far below its precision beside the unmasked entries; tested bit for bit), but no
            # denormal probabilities, which made the matmuls around a shifted block up to 4x slower on CPU.
            mask = self.get_attn_mask(x)
            mask.masked_fill_(mask != 0, float("-inf"))
        windows = self.attn(window_partition(x, self.window_size).view(-1, self.window_area, C), mask=mask)
        x = window_reverse(windows.view(-1, wh, ww, C), self.window_size, Hp, Wp)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :H, :W].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        a = _fill(self.attn_adapter, self._attn(self.norm1(x)))
        x = _fill(self.post_attn, x + self.drop_path1(a))
        x_in = x
        m = self.mlp(self.norm2(x.reshape(B, -1, C))).reshape(B, H, W, C)
        x = x + self.drop_path2(_fill(self.mlp_adapter, m))
        if self.mlp_parallel is not None:
            x = x + self.mlp_parallel(x_in)
        return _fill(self.post_mlp, x)

    def taps(self, x: torch.Tensor):
        return swin_block_taps(self, x)


class PetlViTBlock(ViTBlock):
    """timm's ViT Block with adapter slots. Slots get (B, P+N, C) tokens plus the grid and the prefix count."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        kw = {"hw": self.grid.hw, "num_prefix_tokens": self.num_prefix_tokens}
        a = self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        x = x + self.drop_path1(_fill(self.attn_adapter, a, **kw))
        x = _fill(self.post_attn, x, **kw)
        x_in = x
        m = self.ls2(self.mlp(self.norm2(x)))
        x = x + self.drop_path2(_fill(self.mlp_adapter, m, **kw))
        if self.mlp_parallel is not None:
            x = x + self.mlp_parallel(x_in, **kw)
        return _fill(self.post_mlp, x, **kw)

    def taps(self, x: torch.Tensor):
        return vit_block_taps(self, x)


def family(model: nn.Module) -> str:
    """'swin' or 'vit' for a timm trunk; anything else is a clear error."""
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, VisionTransformer):
        return "vit"
    raise ValueError(
        f"unsupported model type {type(model).__name__}; supported: timm SwinTransformer, VisionTransformer"
    )


def iter_blocks(trunk: nn.Module) -> Iterator[tuple[int, nn.Module, int]]:
    """(stage index, block, channels) for every transformer block, in forward order."""
    if family(trunk) == "swin":
        for s, stage in enumerate(trunk.layers):
            for blk in stage.blocks:
                yield s, blk, blk.dim
    else:
        for blk in trunk.blocks:
            yield 0, blk, trunk.embed_dim


def make_petl(trunk: nn.Module, blk: nn.Module) -> nn.Module:
    """Swap `blk` to the slotted class in place (idempotent) and return it."""
    if isinstance(blk, (PetlSwinBlock, PetlViTBlock)):
        return blk
    if type(blk) is SwinTransformerBlock:
        blk.__class__ = PetlSwinBlock
    elif type(blk) is ViTBlock:
        blk.__class__ = PetlViTBlock
        blk.grid = _grid_state(trunk)
        blk.num_prefix_tokens = trunk.num_prefix_tokens
    else:
        raise ValueError(f"unsupported block type {type(blk).__name__}; supported: timm SwinTransformerBlock, Block")
    for slot in SLOTS:
        setattr(blk, slot, None)
    return blk


def set_swin_arithmetic(model: nn.Module, mode: str) -> None:
    """Make every block of a timm Swin (or a Backbone's Swin trunk) compute `mode` ("official" or "timm"; module
    docstring). State-dict keys do not change.

    "official" also turns on timm's always_partition, so every odd block shifts by window//2 at any input size (and
    a window timm shrank to a build-time map smaller than it gets its full size back, its relative-position table
    resampled by timm). "timm" leaves the shift and window sizes as timm built them.
    """
    if mode not in SWIN_ARITHMETICS:
        raise ValueError(f"swin_arithmetic must be one of {', '.join(SWIN_ARITHMETICS)}, got {mode!r}")
    trunk = getattr(model, "trunk", model)
    if family(trunk) != "swin":
        raise ValueError(f"swin_arithmetic applies to a Swin, not to a {type(trunk).__name__}")
    if hasattr(model, "trunk"):
        model.swin_arithmetic = mode
    if mode == "official":
        trunk.set_input_size(always_partition=True)  # public timm API: full windows and the shift, at any size
    for _, blk, _ in iter_blocks(trunk):
        make_petl(trunk, blk).swin_arithmetic = mode


def _grid_state(trunk: nn.Module) -> GridState:
    """One GridState per ViT, refreshed from the patch embedding's output on every forward."""
    state = getattr(trunk, "_petl_grid", None)
    if state is None:
        state = GridState(trunk.patch_embed.grid_size)
        trunk._petl_grid = state

        def record(module, inputs, out):
            # dynamic_img_size keeps (B, H, W, C); otherwise timm's own grid for the input size (a hybrid ViT's
            # CNN stem has a stride other than its `patch_size`: dynamic_feat_size counts it).
            if out.dim() == 4:
                state.hw = (out.shape[1], out.shape[2])
            else:
                state.hw = tuple(module.dynamic_feat_size(tuple(inputs[0].shape[-2:])))

        trunk.patch_embed.register_forward_hook(record)
    return state


def swin_block_taps(blk: SwinTransformerBlock, x: torch.Tensor):
    """Run a Swin block without its slots, in its own window arithmetic (`_attn`); return (output,
    attention-branch output, MLP-branch output), all (B, H, W, C)."""
    B, H, W, C = x.shape
    a = blk._attn(blk.norm1(x))
    x = x + blk.drop_path1(a)
    m = blk.mlp(blk.norm2(x.reshape(B, -1, C))).reshape(B, H, W, C)
    return x + blk.drop_path2(m), a, m


def vit_block_taps(blk: ViTBlock, x: torch.Tensor):
    """Run a plain ViT block; return (output, attention-branch output, MLP-branch output), all (B, P+N, C)."""
    a = blk.ls1(blk.attn(blk.norm1(x)))
    x = x + blk.drop_path1(a)
    m = blk.ls2(blk.mlp(blk.norm2(x)))
    return x + blk.drop_path2(m), a, m
