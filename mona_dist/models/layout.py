"""What a timm trunk is made of, one entry per family: the ONE place that walks a trunk's stages and blocks.

A `Backbone` owns the layout of its trunk and answers for it (`bb.depth`, `bb.block_units()`, ...); engines,
export and pretrained loading ask the backbone, never the trunk. A new family (EVA-02, SAM ViT, SwinV2, ConvNeXt)
is one more entry here, registered by name, with no engine change.

A trunk is a row of *levels* (the positions a backbone can output: Swin's stages, ViT's blocks), and each level
holds a row of *blocks* (the units FSDP shards, activation checkpointing wraps and torch.compile compiles). A block
is addressed as `(parent, attr)`, `getattr(parent, attr)`, so that a wrapper can replace it in place; whatever
wraps a block already (checkpointing, compile) is what the address holds. An entry also says each level's width
and stride, which outputs a backbone takes by default, how the frozen trunk runs to its outputs and how an output
becomes an NCHW map. The E3VA highway runs the trunk itself (adapters/highway.py: adapters sit below models and
cannot ask a backbone); the backbone names the highway's units from the highway's own attributes.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer

from ..registry import Registry

Unit = tuple[nn.Module, str]


class TrunkLayout:
    """One family's answers about a trunk. Subclasses set `family`, `trunk_type` and `levels_attr`, and say what a
    level holds, its widths, strides and default outputs, and how the frozen trunk computes its levels' outputs."""

    family: str
    trunk_type: type[nn.Module]
    block_type: type[nn.Module]  # the block class the methods' slots fit (adapters/blocks.py), matched exactly
    levels_attr: str  # the trunk's container of levels (an nn.Sequential)
    timm_kwargs: dict = {}  # create_model arguments for every name of the family (models/names.py)
    # timm's classifier, for an exported cls model: its state-dict prefix, and the create_model arguments with which
    # timm computes what a task's linear head on the last output computes
    timm_head: str = "head"
    timm_head_kwargs: dict = {}

    def describe(self) -> str:
        return self.trunk_type.__name__

    def unsupported_block(self, trunk: nn.Module) -> str | None:
        """The class name of the first block the methods cannot fill, or None."""
        for parent, attr in self.block_units(trunk):
            if type(getattr(parent, attr)) is not self.block_type:
                return type(getattr(parent, attr)).__name__
        return None

    def strip_head(self, trunk: nn.Module) -> None:
        """Drop what only timm's classifier uses: the final norm (an output norm takes its place) and the head."""
        trunk.norm = nn.Identity()
        trunk.reset_classifier(0)

    def levels(self, trunk: nn.Module) -> nn.Sequential:
        return getattr(trunk, self.levels_attr)

    def depth(self, trunk: nn.Module) -> int:
        """How many levels the trunk has (stages for Swin, blocks for ViT)."""
        return len(self.levels(trunk))

    def keep_levels(self, trunk: nn.Module, n: int) -> None:
        """Drop every level after the first `n` (a backbone's levels past its last output never run)."""
        setattr(trunk, self.levels_attr, self.levels(trunk)[:n])

    def block_lists(self, trunk: nn.Module) -> list[nn.Module]:
        """The containers of blocks, in forward order."""
        raise NotImplementedError

    def block_units(self, trunk: nn.Module) -> list[Unit]:
        """(parent, attr) of every block, in forward order."""
        return [(blocks, str(j)) for blocks in self.block_lists(trunk) for j in range(len(blocks))]

    def dims(self, trunk: nn.Module) -> list[int]:
        """Channels of each level's output."""
        raise NotImplementedError

    def strides(self, trunk: nn.Module) -> list[int]:
        """Stride of each level's output, in input pixels."""
        raise NotImplementedError

    def default_out_indices(self, depth: int) -> tuple[int, ...]:
        raise NotImplementedError

    def check_input(self, trunk: nn.Module, images: torch.Tensor) -> None:
        """Raise a one-line error for images the trunk cannot take (any size by default)."""

    def features(self, trunk: nn.Module, images: torch.Tensor, out_indices: tuple[int, ...]) -> list[torch.Tensor]:
        """The outputs of the levels in `out_indices`, as the trunk computes them (tokens in the trunk's layout)."""
        raise NotImplementedError

    def to_nchw(self, trunk: nn.Module, f: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """One output of `features` (after its output norm) as a (B, C, H, W) map."""
        raise NotImplementedError


class SwinLayout(TrunkLayout):
    """timm's SwinTransformer: `layers` (stages, downsampling at the start of each but the first), each with
    `blocks`. Outputs are (B, H, W, C) per stage."""

    family, trunk_type, block_type, levels_attr = "swin", SwinTransformer, SwinTransformerBlock, "layers"
    timm_kwargs = {"strict_img_size": False}  # any input size; windows pad
    timm_head = "head.fc"  # timm pools the normed last stage by default

    def describe(self):
        return "SwinTransformer (v1)"

    def block_lists(self, trunk):
        return [stage.blocks for stage in trunk.layers]

    def dims(self, trunk):
        return [stage.blocks[0].dim for stage in trunk.layers]

    def strides(self, trunk):
        return [trunk.patch_embed.patch_size[0] * 2**i for i in range(self.depth(trunk))]

    def default_out_indices(self, depth):
        return tuple(range(depth))

    def features(self, trunk, images, out_indices):
        outs, x = [], trunk.patch_embed(images)
        for s, stage in enumerate(trunk.layers):
            x = stage(x)
            if s in out_indices:
                outs.append(x)
        return outs

    def to_nchw(self, trunk, f, images):
        return f.permute(0, 3, 1, 2).contiguous()  # (B, H, W, C)


class ViTLayout(TrunkLayout):
    """timm's VisionTransformer (DeiT, DeiT-3, DINOv2, CLIP, SigLIP, FlexiViT, hybrids ...): one stage of `blocks`,
    each a level. Outputs are (B, P+N, C) tokens. The patch grid is what the patch embedding produces: a hybrid
    ViT's embedding is a CNN stem (timm `HybridEmbed`) whose stride is not its `patch_size`, so strides and grids
    come from timm's `feat_ratio()` / `dynamic_feat_size()`, which both embeddings have."""

    family, trunk_type, block_type, levels_attr = "vit", VisionTransformer, Block, "blocks"
    timm_kwargs = {"dynamic_img_size": True}
    # the task averages the normed patch tokens: timm's global_pool='avg' without its extra fc_norm
    timm_head_kwargs = {"global_pool": "avg", "fc_norm": False}

    def block_lists(self, trunk):
        return [trunk.blocks]

    def describe(self):
        return "VisionTransformer (with timm Block blocks)"

    def strip_head(self, trunk):
        super().strip_head(trunk)
        # Pooling belongs to the classifier: SigLIP's attention pool ('map'), the average-pool models' fc_norm.
        # Kept, they would be parameters that never get a gradient (DDP's unused-parameter error under `full`).
        trunk.attn_pool = None
        trunk.fc_norm = nn.Identity()

    def dims(self, trunk):
        return [trunk.embed_dim] * self.depth(trunk)

    def strides(self, trunk):
        return [trunk.patch_embed.feat_ratio(as_scalar=False)[0]] * self.depth(trunk)

    def default_out_indices(self, depth):
        return tuple((i + 1) * depth // 4 - 1 for i in range(4))  # 4 evenly spaced blocks

    def check_input(self, trunk, images):
        # a hybrid's stem rounds other sizes its own way; on multiples of its stride every grid formula agrees
        sh, sw = trunk.patch_embed.feat_ratio(as_scalar=False)
        if images.shape[-2] % sh or images.shape[-1] % sw:
            raise ValueError(f"ViT input {tuple(images.shape[-2:])} is not divisible by the patch size {sh}")

    def features(self, trunk, images, out_indices):
        outs, x = [], trunk.patch_embed(images)
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(x)))
        for i, blk in enumerate(trunk.blocks):
            x = blk(x)
            if i in out_indices:
                outs.append(x)
        return outs

    def to_nchw(self, trunk, f, images):
        h, w = trunk.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        patches = f[:, trunk.num_prefix_tokens :]  # the prefix (cls, register) tokens have no place on the grid
        return patches.transpose(1, 2).reshape(f.shape[0], f.shape[-1], h, w)


LAYOUTS: Registry[TrunkLayout] = Registry("backbone family")
LAYOUTS.add("swin", SwinLayout())
LAYOUTS.add("vit", ViTLayout())


def layout_of(trunk: nn.Module) -> TrunkLayout:
    """The layout of a timm trunk's family; anything else is a clear error."""
    for name in LAYOUTS:
        layout = LAYOUTS.get(name)
        if isinstance(trunk, layout.trunk_type):
            return layout
    supported = " or ".join(LAYOUTS.get(n).describe() for n in LAYOUTS)
    raise ValueError(f"unsupported model type {type(trunk).__name__}; supported: timm {supported}")
