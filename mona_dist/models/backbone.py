"""Backbones: a timm Swin or ViT trunk, a tuning method, and output norms -> a list of NCHW maps for a neck.

    bb = build_backbone("swin_large_patch4_window7_224", "mona", drop_path_rate=0.3)
    feats = bb(images)            # 4 maps, strides 4/8/16/32, channels bb.out_channels

Swin outputs every stage by default; ViT outputs 4 evenly spaced blocks (stride 16 each; a task neck makes the
pyramid). Each output passes its own LayerNorm (`out_norms`, as in the detection/segmentation Swin of the papers).

Swin computes the official Swin arithmetic by default (`swin_arithmetic="official"`, see adapters/blocks.py):
the patch embedding pads H, W up to the patch size, windows pad then shift on every odd block, and the output
norms start at their init (1, 0): the official runs never load the release's final `norm` (an unexpected key in
their logs). `swin_arithmetic="timm"` computes what timm computes and starts the last output norm from the trunk's
final norm: the right choice for timm classification checkpoints. Under the block methods the output norms stay
frozen (the Mona recipe); full/norm/bitfit select them by name; E3VA and mona_hw train them.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from ..adapters import apply_method
from ..adapters.blocks import SWIN_ARITHMETICS, set_swin_arithmetic
from .layout import Unit, layout_of
from .names import BACKBONES, BackboneSpec, backbone_spec  # noqa: F401  (BACKBONES, BackboneSpec: re-exported)


class Backbone(nn.Module):
    """A timm trunk with a method applied, returning NCHW maps. Build it with `build_backbone`."""

    def __init__(
        self, name: str, trunk: nn.Module, out_indices: tuple[int, ...] | None = None, swin_arithmetic: str = "official"
    ):
        super().__init__()
        if swin_arithmetic not in SWIN_ARITHMETICS:
            raise ValueError(f"swin_arithmetic must be one of {', '.join(SWIN_ARITHMETICS)}, got {swin_arithmetic!r}")
        self.name = name
        self.layout = layout_of(trunk)  # what the trunk is made of: the one place that walks it (layout.py)
        self.family = self.layout.family
        # ViT has one arithmetic; the attribute still says which loading rules apply (pretrained.py).
        self.swin_arithmetic = swin_arithmetic if self.family == "swin" else "timm"
        self.method = None
        self.highway = None
        dims, strides = self.layout.dims(trunk), self.layout.strides(trunk)
        default = self.layout.default_out_indices(len(dims))
        # Negative indices count from the end, as in Python: (-1,) is the last stage / block.
        out_indices = default if out_indices is None else tuple(i % len(dims) if i < 0 else i for i in out_indices)
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not 0 <= out_indices[-1] < len(dims):
            raise ValueError(f"out_indices must be increasing indices below {len(dims)}, got {list(out_indices)}")
        self.out_indices = out_indices
        self.out_channels = [dims[i] for i in out_indices]
        self.out_strides = [strides[i] for i in out_indices]
        # Stages/blocks after the last output would never run (and would be unused parameters under DDP).
        self.layout.keep_levels(trunk, out_indices[-1] + 1)
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.out_channels)
        if self.swin_arithmetic == "timm" and out_indices[-1] == len(dims) - 1 and isinstance(trunk.norm, nn.LayerNorm):
            self.out_norms[-1].load_state_dict(trunk.norm.state_dict())
            self.out_norms[-1].eps = trunk.norm.eps  # the release's own norm, whole: timm's ViT uses 1e-6, not 1e-5
        if self.family == "swin":
            trunk.patch_embed.dynamic_img_pad = True  # bottom/right zero padding up to the patch size, as official
            set_swin_arithmetic(trunk, swin_arithmetic)
        self.layout.strip_head(trunk)
        self.trunk = trunk
        # The trunk's own tensors (before any method adds some): what "the backbone loaded" is measured against.
        self.trunk_keys = frozenset(trunk.state_dict())

    # -- units: what engines shard, checkpoint and compile, and what export and loading count ------------------
    @property
    def depth(self) -> int:
        """Levels the trunk runs: stages (Swin) or blocks (ViT), those after the last output already dropped."""
        return self.layout.depth(self.trunk)

    def block_units(self) -> list[Unit]:
        """(parent, attr) of every transformer block, in forward order, whatever the method (highway methods
        included) and whatever wraps a block already (activation checkpointing, compile): what FSDP shards one by
        one, and what torch.compile compiles one by one under the block methods."""
        return self.layout.block_units(self.trunk)

    def highway_units(self) -> list[Unit]:
        """(parent, attr) of every highway adapter, attention taps' first (empty without a highway)."""
        hw = self.highway
        if hw is None:
            return []
        return [(mods, str(i)) for mods in (hw.attn_adapters, hw.mlp_adapters) for i in range(len(mods))]

    def checkpoint_units(self) -> list[Unit]:
        """What activation checkpointing wraps. Block methods: each block. Highway methods: the highway adapters
        it names (the frozen trunk runs without grad and keeps nothing, so checkpointing it would only cost time)."""
        return self.highway.checkpoint_units() if self.highway is not None else self.block_units()

    def compile_units(self) -> tuple[list[Unit], list[nn.Module]]:
        """(units torch.compile wraps, blocks whose `taps` method it compiles): the blocks under a block method;
        the highway adapters plus every block's frozen `taps` pass under a highway method."""
        if self.highway is None:
            return self.block_units(), []
        return self.highway_units(), [getattr(parent, attr) for parent, attr in self.block_units()]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.layout.check_input(self.trunk, images)
        if self.highway is not None:
            feats = self.highway(self.trunk, images)
        else:
            feats = self.layout.features(self.trunk, images, self.out_indices)
        return [self.layout.to_nchw(self.trunk, norm(f), images) for norm, f in zip(self.out_norms, feats)]


def build_backbone(
    name: str,
    method: str = "full",
    pretrained: str | None = None,
    out_indices: tuple[int, ...] | None = None,
    drop_path_rate: float = 0.0,
    swin_arithmetic: str = "official",
    **method_options,
) -> Backbone:
    """Build a timm Swin/ViT by name (any timm SwinTransformer or VisionTransformer name, or one of our small
    `BACKBONES`: models/names.py), apply `method`, then load `pretrained`: a local file, or a timm
    pretrained tag / `timm/<name>` / `hf-hub:<repo>` fetched through the Hugging Face cache (models/hub.py).

    Weights load after the method is applied, so official Mona checkpoints (which carry the Mona modules) load
    whole: see `mona_dist.models.pretrained.load_pretrained` for the formats. `swin_arithmetic`: "official" (the
    official Swin/Mona code) or "timm" (module docstring); ViT ignores it.
    """
    spec = backbone_spec(name)  # unknown names and unsupported families: one line, before anything is built
    trunk = timm.create_model(spec.timm_name, pretrained=False, drop_path_rate=drop_path_rate, **spec.timm_kwargs)
    bb = Backbone(name, trunk, out_indices, swin_arithmetic)
    apply_method(bb, method, **method_options)  # records the options, defaults filled in, as bb.method_options
    if pretrained:
        from .pretrained import load_pretrained

        load_pretrained(bb, pretrained)
    return bb


def build_backbone_from_adapter(path, pretrained: str | None = None, drop_path_rate: float = 0.0) -> Backbone:
    """The backbone an adapter file describes (its backbone, method, options, outputs and arithmetic metadata),
    with the file's tensors loaded: from a bare backbone's file, or the backbone part of a task model's.

    The frozen trunk is not in the file: `pretrained` gives its weights; None takes the `pretrained` the file
    records (the trainer writes the run's `model.pretrained`), if any; "" builds it without pretrained weights.
    """
    import json

    from ..adapters.io import load_adapter, read_adapter_metadata

    meta = read_adapter_metadata(path)
    lacking = [k for k in ("backbone", "method") if not meta.get(k)]
    if lacking:
        raise ValueError(f"{path} does not say which {lacking[0]} it was saved from (a file written before "
                         f"adapters carried metadata): build it with build_backbone(...) and load_adapter")
    options = json.loads(meta.get("method_options", "{}"))
    out_indices = tuple(json.loads(meta["out_indices"])) if "out_indices" in meta else None
    weights = meta.get("pretrained") if pretrained is None else pretrained
    bb = build_backbone(meta["backbone"], meta["method"], pretrained=weights or None, out_indices=out_indices,
                        drop_path_rate=drop_path_rate, swin_arithmetic=meta.get("swin_arithmetic", "official"),
                        **options)
    load_adapter(bb, path, prefix=meta.get("backbone_prefix", ""))
    return bb


def backbones(model: nn.Module) -> list[Backbone]:
    """Every Backbone in `model` (a backbone, a task model, a detector), in `modules()` order."""
    return [m for m in model.modules() if isinstance(m, Backbone)]


def block_units(model: nn.Module) -> list[Unit]:
    """`Backbone.block_units` of every backbone in `model`; empty for a model without one."""
    return [u for bb in backbones(model) for u in bb.block_units()]


def checkpoint_units(model: nn.Module) -> list[Unit]:
    """`Backbone.checkpoint_units` of every backbone in `model`: what activation checkpointing should wrap."""
    return [u for bb in backbones(model) for u in bb.checkpoint_units()]


def compile_units(model: nn.Module) -> tuple[list[Unit], list[nn.Module]]:
    """`Backbone.compile_units` of every backbone in `model`, concatenated."""
    modules, taps = [], []
    for bb in backbones(model):
        m, t = bb.compile_units()
        modules += m
        taps += t
    return modules, taps
