"""Backbone names: our own small names (`BACKBONES`), and any timm name whose family has a layout entry.

    backbone_spec("vit_small_patch14_reg4_dinov2")  # BackboneSpec(that name, {"dynamic_img_size": True}, "vit")
    check_backbone_name("convnext_tiny")            # ValueError, one line: its timm class and what is supported

A name that is not ours is asked of timm: `timm.is_model`, then the class its entrypoint builds on the `meta` device
(no weights, a fraction of a second even for ViT-g; cached per name). It is accepted when that class has an entry in
layout.py (`LAYOUTS`) and its blocks are the block class that entry's methods know (timm's `Block` for ViT: the
parallel-branch and post-norm blocks of a few timm ViTs are refused by name, since Mona's and every method's slots
sit in `Block`'s order). The timm kwargs come from the family's layout entry (`strict_img_size=False` for Swin,
`dynamic_img_size=True` for ViT), so every name of a family builds the same way. Validation builds no weights: a
config's backbone is checked once, at load (config/loader.py), and a typo fails there in one line.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field

import timm
import torch

from ..registry import Registry
from .layout import LAYOUTS, TrunkLayout


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    timm_kwargs: dict = field(default_factory=dict)
    family: str = ""


# Small enough for CPU tests, demos and CI; same code paths as the large ones. Any timm Swin / ViT name needs no
# entry here (backbone_spec asks timm).
BACKBONES: Registry[BackboneSpec] = Registry("backbone")
BACKBONES.add(
    "swin_nano_patch4_window7",
    BackboneSpec(
        "swin_tiny_patch4_window7_224",
        {"strict_img_size": False, "embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)},
        "swin",
    ),
)
BACKBONES.add(
    "vit_nano_patch16",
    BackboneSpec("vit_small_patch16_224", {"dynamic_img_size": True, "embed_dim": 64, "depth": 4, "num_heads": 2},
                 "vit"),
)


def supported() -> str:
    """What a backbone name may be, in one clause."""
    families = " or ".join(LAYOUTS.get(n).describe() for n in LAYOUTS)
    return f"any timm {families} name, or one of {', '.join(BACKBONES.names())}"


@functools.lru_cache(maxsize=None)
def _timm_class(name: str) -> tuple[str, str | None, str | None]:
    """(timm class name, family or None, the unsupported block class or None) of a timm architecture name."""
    with torch.device("meta"):  # shapes only: no memory, no init cost worth the name
        model = timm.create_model(name, pretrained=False)
    cls = type(model).__name__
    layout = _layout_for(model)
    if layout is None:
        return cls, None, None
    return cls, layout.family, layout.unsupported_block(model)


def _layout_for(model: torch.nn.Module) -> TrunkLayout | None:
    for n in LAYOUTS:
        if isinstance(model, LAYOUTS.get(n).trunk_type):
            return LAYOUTS.get(n)
    return None


def _close(name: str) -> str:
    """'; close: ...' naming up to 4 known names that contain `name` or are spelled like it ('' if none)."""
    known = BACKBONES.names() + timm.list_models()
    close = [n for n in known if name.lower() in n] if "/" not in name and ":" not in name else []
    close += [n for n in difflib.get_close_matches(name, known, n=4, cutoff=0.75) if n not in close]
    return f"; close: {', '.join(close[:4])}" if close else ""


def check_backbone_name(name: str) -> None:
    """Raise a one-line ValueError unless `name` is one of ours or a timm name of a supported family."""
    backbone_spec(name)


def backbone_spec(name: str) -> BackboneSpec:
    """How to build backbone `name`: our registered spec, or the timm name with its family's kwargs.
    Unknown names, pretrained tags and names of unsupported families are one-line ValueErrors."""
    if name in BACKBONES:
        return BACKBONES.get(name)
    arch, dot, _ = name.partition(".")
    if dot and "/" not in name and ":" not in name and timm.is_model(arch):
        raise ValueError(f"backbone {name!r} carries a pretrained tag: name the architecture ({arch!r}) as the "
                         f"backbone and the weights as model.pretrained ({name!r})")
    if "/" in name or ":" in name or not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}; valid: {supported()}{_close(name)}")
    cls, family, block = _timm_class(name)
    if family is None:
        raise ValueError(f"backbone {name!r} is a timm {cls}, a family mona-dist does not support; supported: "
                         f"{supported()}")
    if block is not None:
        raise ValueError(f"backbone {name!r} is a timm {cls} with {block} blocks, which no method's slots fit; "
                         f"supported: {supported()}")
    return BackboneSpec(name, dict(LAYOUTS.get(family).timm_kwargs), family)
