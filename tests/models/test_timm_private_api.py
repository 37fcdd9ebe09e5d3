"""Canary for timm's private API that mona_dist builds on (timm has no upper bound in pyproject.toml).

- `SwinTransformerBlock._attn(self, x)`: `PetlSwinBlock` (mona_dist/adapters/blocks.py) overrides it with the
  official window arithmetic, calls it through `super()._attn(x)` for `swin_arithmetic="timm"`, and the E3VA
  highway's `swin_block_taps` calls it on a frozen block. Ours also calls `get_attn_mask(x)`, `self.attn(x,
  mask=...)`, `window_partition(x, window_size)`, `window_reverse(windows, window_size, H, W)` and reads
  `window_size`, `shift_size`, `window_area`.
- `VisionTransformer._pos_embed(self, x)`: the backbone's ViT pass (mona_dist/models/) and the E3VA highway
  (mona_dist/adapters/highway.py) call it between the patch embedding and the first block, with
  `patch_drop`, `norm_pre` and `num_prefix_tokens`.

Measured on timm 1.0.31. A timm release that renames, removes or re-signs any of them fails here with a message
naming the private API and the module of ours that depends on it, before any numerical test fails obscurely.
docs/upstream.md lists this canary with the other workarounds.
"""

from __future__ import annotations

import inspect

import pytest
import timm
import torch
from timm.models import swin_transformer as swin
from timm.models.vision_transformer import VisionTransformer

from mona_dist.adapters.blocks import PetlSwinBlock
from mona_dist.models import build_backbone

OURS_SWIN = "mona_dist/adapters/blocks.py (PetlSwinBlock._attn, swin_block_taps)"
OURS_VIT = ("the backbone's ViT pass in mona_dist/models/ and mona_dist/adapters/highway.py "
            "(grep -rn _pos_embed mona_dist)")


def require(owner, name: str, params: list[str], ours: str):
    """owner.name exists in timm, is callable, and its leading parameters are `params` (what our code passes)."""
    label = f"timm {timm.__version__}: {getattr(owner, '__name__', owner)}.{name}"
    fn = getattr(owner, name, None)
    assert callable(fn), f"{label} is gone; {ours} calls this private timm API (canary: timm changed it)"
    got = list(inspect.signature(fn).parameters)
    assert got[: len(params)] == params, (
        f"{label} now has parameters {got}, ours calls it as ({', '.join(params)}); {ours} depends on it"
    )
    return fn


def test_swin_block_private_api_is_what_we_call():
    assert "_attn" in vars(swin.SwinTransformerBlock), (
        f"timm {timm.__version__}: SwinTransformerBlock._attn is no longer defined on SwinTransformerBlock; "
        f"{OURS_SWIN} overrides it"
    )
    require(swin.SwinTransformerBlock, "_attn", ["self", "x"], OURS_SWIN)
    require(swin.SwinTransformerBlock, "get_attn_mask", ["self", "x"], OURS_SWIN)
    require(swin.WindowAttention, "forward", ["self", "x", "mask"], OURS_SWIN)
    require(swin, "window_partition", ["x", "window_size"], OURS_SWIN)
    require(swin, "window_reverse", ["windows", "window_size", "H", "W"], OURS_SWIN)
    blk = build_backbone("swin_nano_patch4_window7", "fixed").trunk.layers[0].blocks[1]
    for attr in ("window_size", "shift_size", "window_area", "attn", "norm1", "norm2", "mlp", "drop_path1"):
        assert hasattr(blk, attr), f"timm {timm.__version__}: SwinTransformerBlock.{attr} is gone; {OURS_SWIN} reads it"
    assert len(blk.window_size) == 2 and len(blk.shift_size) == 2, (
        f"timm {timm.__version__}: SwinTransformerBlock.window_size / shift_size are no longer (h, w) pairs; "
        f"{OURS_SWIN} unpacks them"
    )


def test_vit_private_api_is_what_we_call():
    require(VisionTransformer, "_pos_embed", ["self", "x"], OURS_VIT)
    vit = build_backbone("vit_nano_patch16", "fixed").trunk
    for attr in ("patch_drop", "norm_pre", "num_prefix_tokens", "patch_embed"):
        assert hasattr(vit, attr), f"timm {timm.__version__}: VisionTransformer.{attr} is gone; {OURS_VIT} uses it"


def spy(monkeypatch, owner, name: str) -> list:
    calls, original = [], vars(owner)[name]

    def wrapped(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return calls


@pytest.mark.parametrize("method", ["mona", "e3va"])
def test_our_swin_attn_override_is_the_one_called(monkeypatch, method):
    """Every block's attention goes through PetlSwinBlock._attn (official arithmetic: timm's never runs);
    `swin_arithmetic="timm"` reaches timm's `_attn` through ours."""
    bb = build_backbone("swin_nano_patch4_window7", method)
    n_blocks = sum(len(stage.blocks) for stage in bb.trunk.layers)
    ours, theirs = spy(monkeypatch, PetlSwinBlock, "_attn"), spy(monkeypatch, swin.SwinTransformerBlock, "_attn")
    bb(torch.randn(1, 3, 64, 64))
    assert len(ours) == n_blocks and theirs == [], (
        f"timm {timm.__version__}: Swin blocks no longer route attention through _attn "
        f"({len(ours)} calls of PetlSwinBlock._attn, {len(theirs)} of timm's, {n_blocks} blocks); {OURS_SWIN}"
    )
    ours.clear()
    bb_timm = build_backbone("swin_nano_patch4_window7", method, swin_arithmetic="timm")
    bb_timm(torch.randn(1, 3, 64, 64))
    assert len(ours) == n_blocks and len(theirs) == n_blocks


@pytest.mark.parametrize("method", ["mona", "e3va"])
def test_vit_paths_call_pos_embed(monkeypatch, method):
    """The plain backbone and the highway both embed positions through timm's `_pos_embed`, once per forward."""
    bb = build_backbone("vit_nano_patch16", method)
    calls = spy(monkeypatch, VisionTransformer, "_pos_embed")
    feats = bb(torch.randn(1, 3, 48, 48))
    assert len(calls) == 1, f"timm {timm.__version__}: VisionTransformer._pos_embed ran {len(calls)} times; {OURS_VIT}"
    assert all(f.shape[-2:] == (3, 3) for f in feats)
