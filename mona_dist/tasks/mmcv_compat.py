"""mmcv's compiled kernels (`mmcv._ext`) from torchvision, so mmseg 1.2.2 and mmdet 3.3.0 run on current torch.

Why: both need mmcv >= 2.0.0rc4, < 2.2.0. The full mmcv 2.1.0 does not compile against torch >= 2.10 (C++20);
mmcv-lite 2.1.0 installs and ships every Python op wrapper (`mmcv/ops/*.py`: `batched_nms`, `RoIAlign`,
`sigmoid_focal_loss`, ...), but not the compiled extension they load when imported
(`ext_loader.load_ext('_ext', [kernel names])`, which asserts each name exists). `install()` registers a module
named `mmcv._ext` in `sys.modules`, only where the real extension is missing; then `import mmcv.ops` succeeds,
mmcv's own wrappers run unchanged, and `import mmseg.models` / `import mmdet.models` find every `mmcv.ops` name.

The kernels the papers' models call are torchvision's, which has CPU and CUDA kernels for each:
- `nms` (mmcv `offset` 1 = the legacy "+1" widths: torchvision's nms on boxes whose x2, y2 are moved by +1),
- `roi_align_forward` / `roi_align_backward` (average pooling; mmcv's and torchvision's arithmetic is the same:
  `aligned` shifts by half a pixel, sampling_ratio 0 samples adaptively) through `torchvision::roi_align` and the
  registered `torchvision::_roi_align_backward`,
- `roi_pool_forward` / `roi_pool_backward` through `torchvision::roi_pool` / `_roi_pool_backward`,
- `sigmoid_focal_loss_forward` / `_backward` through `torchvision.ops.sigmoid_focal_loss` (mmcv's targets: class
  indices, index C = no class; forward and gradient per element, as mmcv's kernels write them).
Cascade Mask R-CNN calls nms and roi_align forward/backward; RetinaNet nms and, on CUDA, the focal loss (mmdet
computes it in Python on CPU). Every other kernel mmcv asks for is a function that raises NotImplementedError
naming it, so a model needing one fails at its first call with that name, not at import.

Use `import_models("mmseg")` / `import_models("mmdet")` instead of `import mmseg.models` anywhere in mona_dist.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import warnings

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

EXT_NAME = "mmcv._ext"


def compiled_ext_available() -> bool:
    """True when mmcv's real compiled extension is installed (full mmcv), whatever sits in sys.modules."""
    import mmcv

    return importlib.machinery.PathFinder.find_spec("_ext", list(mmcv.__path__)) is not None


# ---- the kernels (signatures as mmcv's wrappers call them: outputs are written in place) -------------------------


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """Indices of the kept boxes, highest score first. `offset` 1 measures widths as x2 - x1 + 1 (mmcv's legacy)."""
    if offset not in (0, 1):
        raise ValueError(f"mmcv._ext.nms: offset must be 0 or 1, got {offset}")
    boxes = boxes.float()
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + 1.0], dim=1)
    return torch.ops.torchvision.nms(boxes, scores.float(), float(iou_threshold))


def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width, spatial_scale,
                      sampling_ratio, pool_mode, aligned) -> None:
    if pool_mode != 1:
        raise NotImplementedError("mmcv._ext.roi_align_forward with pool_mode='max' has no torchvision kernel "
                                  "(mona_dist.tasks.mmcv_compat provides pool_mode='avg')")
    output.copy_(torch.ops.torchvision.roi_align(input, rois.to(input.dtype), float(spatial_scale),
                                                 int(aligned_height), int(aligned_width), int(sampling_ratio),
                                                 bool(aligned)))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height, aligned_width,
                       spatial_scale, sampling_ratio, pool_mode, aligned) -> None:
    if pool_mode != 1:
        raise NotImplementedError("mmcv._ext.roi_align_backward with pool_mode='max' has no torchvision kernel")
    b, c, h, w = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois.to(grad_output.dtype), float(spatial_scale), int(aligned_height), int(aligned_width),
        b, c, h, w, int(sampling_ratio), bool(aligned)))


def roi_pool_forward(input, rois, output, argmax, pooled_height, pooled_width, spatial_scale) -> None:
    out, arg = torch.ops.torchvision.roi_pool(input, rois.to(input.dtype), float(spatial_scale), int(pooled_height),
                                              int(pooled_width))
    output.copy_(out)
    argmax.copy_(arg)


def roi_pool_backward(grad_output, rois, argmax, grad_input, pooled_height, pooled_width, spatial_scale) -> None:
    b, c, h, w = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_pool_backward(
        grad_output, rois.to(grad_output.dtype), argmax.int(), float(spatial_scale), int(pooled_height),
        int(pooled_width), b, c, h, w))


def _focal(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float, alpha: float):
    """mmcv's per-element sigmoid focal loss: target (N,) class indices, C = no class; times weight[target] where
    a weight is given (rows of no class keep weight 1: mmcv's kernel would read past the end of `weight`)."""
    num_classes = logits.shape[1]
    onehot = F.one_hot(target.long(), num_classes + 1)[:, :num_classes].to(logits.dtype)
    loss = _tv_sigmoid_focal_loss(logits, onehot, alpha=float(alpha), gamma=float(gamma), reduction="none")
    if weight is not None and weight.numel() > 0:
        padded = torch.cat([weight.to(loss.dtype), weight.new_ones(1, dtype=loss.dtype)])
        loss = loss * padded[target.long()].unsqueeze(1)
    return loss


def sigmoid_focal_loss_forward(input, target, weight, output, gamma, alpha) -> None:
    output.copy_(_focal(input, target, weight, gamma, alpha))


def sigmoid_focal_loss_backward(input, target, weight, grad_input, gamma, alpha) -> None:
    # Each element's loss depends on its own logit only: the gradient of the sum is the per-element derivative,
    # which is what mmcv's kernel writes (its wrapper multiplies by grad_output afterwards).
    with torch.enable_grad():
        x = input.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_focal(x, target, weight, gamma, alpha).sum(), x)
    grad_input.copy_(grad)


PROVIDED = {f.__name__: f for f in (nms, roi_align_forward, roi_align_backward, roi_pool_forward, roi_pool_backward,
                                    sigmoid_focal_loss_forward, sigmoid_focal_loss_backward)}


def _missing(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"mmcv._ext.{name}: mmcv's compiled kernel {name!r} is not installed (mmcv-lite) and "
            f"mona_dist.tasks.mmcv_compat provides only {', '.join(sorted(PROVIDED))}")

    kernel.__name__ = name
    return kernel


def _build() -> types.ModuleType:
    ext = types.ModuleType(EXT_NAME, "torchvision's kernels standing in for mmcv's compiled ops "
                                     "(mona_dist.tasks.mmcv_compat).")
    for name, fn in PROVIDED.items():
        setattr(ext, name, fn)
    missing: list[str] = []

    def __getattr__(name: str):
        # Dunder lookups (pickle, inspect, copy) must see a plain missing attribute.
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        fn = _missing(name)
        setattr(ext, name, fn)  # asked once by load_ext's hasattr, found directly afterwards
        missing.append(name)
        return fn

    ext.__getattr__ = __getattr__
    ext.missing_kernels = missing  # names mmcv asked for that raise NotImplementedError
    ext.__mona_dist_standin__ = True
    # mmengine's `mmcv_full_available` (its optimizer constructor asks it) runs pkgutil.find_loader("mmcv._ext"),
    # which raises on a module without a spec. A spec without a loader answers "mmcv-lite", as before the stand-in.
    ext.__spec__ = importlib.machinery.ModuleSpec(EXT_NAME, None)
    return ext


def install() -> bool:
    """Register the stand-in `mmcv._ext` unless the real one is installed. Returns True if the stand-in is in use."""
    current = sys.modules.get(EXT_NAME)
    if current is not None:
        return bool(getattr(current, "__mona_dist_standin__", False))
    if compiled_ext_available():
        return False
    sys.modules[EXT_NAME] = _build()
    return True


def standin() -> types.ModuleType | None:
    """The stand-in module when it is in use."""
    ext = sys.modules.get(EXT_NAME)
    return ext if getattr(ext, "__mona_dist_standin__", False) else None


def import_models(package: str) -> types.ModuleType:
    """`import <package>.models` ("mmseg" or "mmdet", registering every model) with mmcv's kernels in place."""
    install()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(MultiScaleDeformableAttention|Fail to import).*")
        return importlib.import_module(f"{package}.models")
