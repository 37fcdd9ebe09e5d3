"""Make `import mmseg.models` work with mmcv-lite (no compiled `mmcv._ext`) on current torch.

mmsegmentation 1.2.2 imports two compiled mmcv ops at module level (`mmcv.ops.point_sample` in
`mmseg/utils/mask_classification.py` and `mmseg/models/utils/point_sample.py`, `mmcv.ops.sigmoid_focal_loss` in
`mmseg/models/losses/focal_loss.py`). mmcv-lite ships `mmcv/ops/*.py` but not the `_ext` library they load, and the
full mmcv 2.1.0 does not compile against torch >= 2.10. So, only when `mmcv._ext` is absent, `install()` registers
a small stand-in `mmcv.ops` module in `sys.modules` that holds pure-PyTorch versions of those two ops. Any other op
raises `ModuleNotFoundError`, which is what mmseg's optional imports (`CrissCrossAttention`, `PSAMask`, ...) catch.

mmengine 0.10.7 `load_checkpoint` calls `torch.load` without `weights_only=False` and fails on torch >= 2.6: this
package never uses it (weights load through `mona_dist.models.load_pretrained`).

Use `import_mmseg_models()` instead of `import mmseg.models` anywhere in mona_dist.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

SHIM_NAME = "mmcv.ops"


def compiled_ops_available() -> bool:
    """True when mmcv's compiled extension is importable (full mmcv): then the real `mmcv.ops` is used."""
    return importlib.util.find_spec("mmcv") is not None and importlib.util.find_spec("mmcv._ext") is not None


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False, **kwargs) -> torch.Tensor:
    """mmcv's `point_sample`: sample `input` (N, C, H, W) at `points` in [0, 1]² ((N, P, 2) or (N, Hg, Wg, 2)).

    Same arithmetic as mmcv (which is itself a grid_sample wrapper): coordinates map to grid_sample's [-1, 1]
    by 2·p − 1, `align_corners=False` by default. Returns (N, C, P) or (N, C, Hg, Wg).
    """
    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    out = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return out.squeeze(3) if add_dim else out


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """mmcv's `sigmoid_focal_loss` signature on top of torchvision's.

    mmcv takes logits (N, C) and class indices (N,) where index C means "no class" (all negatives), weights each
    element by `weight[target]`, and its "mean" divides the sum by N (not N·C).
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"sigmoid_focal_loss: reduction must be none/mean/sum, got {reduction!r}")
    num_classes = input.shape[1]
    onehot = F.one_hot(target.long(), num_classes + 1)[:, :num_classes].to(input.dtype)
    loss = _tv_sigmoid_focal_loss(input, onehot, alpha=alpha, gamma=gamma, reduction="none")
    if weight is not None and weight.numel() > 0:
        loss = loss * weight[target].unsqueeze(1)
    if reduction == "mean":
        return loss.sum() / input.shape[0]
    return loss.sum() if reduction == "sum" else loss


def _missing_op(name: str):
    # Dunder lookups (pickle, inspect, pytest, `from x import *`) must see a plain missing attribute.
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise ModuleNotFoundError(
        f"mmcv.ops.{name} needs mmcv's compiled ops, which are not installed "
        f"(mona_dist.tasks.mmseg_compat provides only point_sample and sigmoid_focal_loss)"
    )


def install() -> bool:
    """Register the stand-in `mmcv.ops` if the compiled ops are missing. Returns True if the shim is in place."""
    current = sys.modules.get(SHIM_NAME)
    if getattr(current, "__mona_dist_shim__", False):
        return True
    if compiled_ops_available():
        return False
    import mmcv

    shim = types.ModuleType(SHIM_NAME, "Pure-PyTorch stand-in for mmcv.ops (see mona_dist.tasks.mmseg_compat).")
    shim.point_sample = point_sample
    shim.sigmoid_focal_loss = sigmoid_focal_loss
    shim.__getattr__ = _missing_op
    shim.__mona_dist_shim__ = True
    sys.modules[SHIM_NAME] = shim
    mmcv.ops = shim
    return True


def import_mmseg_models() -> types.ModuleType:
    """`import mmseg.models` (registering every mmseg model) after installing the shim where needed."""
    install()
    with warnings.catch_warnings():
        # mmcv.cnn tries the compiled MultiScaleDeformableAttention and warns that mmcv-lite lacks it: expected.
        warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
        return importlib.import_module("mmseg.models")
