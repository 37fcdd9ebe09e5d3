"""torchvision detectors fed by mona_dist's detection pipeline, with results mapped back to the original image.

The pipeline (mona_dist.data) pads nothing; each target carries the size the worker drew (`"size"`), and
`Detector` resizes the uint8 images, their boxes and masks to it and normalises them on the device
(`DataPreprocessor.detection`). torchvision's `GeneralizedRCNNTransform` would normalise and resize again, and its
postprocess maps results back to the size the *model* was given.
`PrenormalizedTransform` keeps only what is still needed (batching with padding to `size_divisible`) and hands
postprocessing to `Detector`, which knows each image's `orig_size` and maps boxes and masks to it with
torchvision's own postprocess (masks are pasted directly at the original resolution, as mmdet does with
`rescale=True`).

Precision boundary (`fp32_heads`): only the backbone and FPN run in the compute dtype. Their maps leave in fp32,
each head module computes in its weights' dtype (fp32 weights under autocast, bf16 under DeepSpeed) and hands
back fp32, so anchors, box decoding, NMS, RoI pooling and the losses all see fp32 -- where mmdet's fp16 puts them
(`force_fp32`). torchvision's `nms` / `roi_align` have no bf16 kernels, and `batched_nms` offsets each class's
boxes by the largest coordinate: bf16 cannot tell 20 020 from 20 030.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.distributed as torch_dist
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from mona_dist.data.preprocess import DataPreprocessor
from mona_dist.tasks.base import scored_batches


class PrenormalizedTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform for images that arrive resized and normalised: only batches (pads to /32).

    Overriding `normalize` and `resize` is the clean no-op: mean 0 / std 1 alone would still do the arithmetic,
    and there is no min_size/max_size setting that leaves every size unchanged. `postprocess` is deferred to
    `to_original`, called with the true original sizes.
    """

    def __init__(self, size_divisible: int = 32):
        super().__init__(
            min_size=1, max_size=1, image_mean=[0.0] * 3, image_std=[1.0] * 3, size_divisible=size_divisible
        )

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            raise TypeError(f"detection images must be float (normalised by Detector.preprocess), got {image.dtype}")
        return image

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result

    def to_original(self, result, image_shapes, original_sizes):
        """Boxes rescaled and masks pasted from the model's input sizes to `original_sizes` ((H0, W0) each)."""
        training, self.training = self.training, False
        try:
            return super().postprocess(result, image_shapes, original_sizes)
        finally:
            self.training = training


# The modules with weights that torchvision's detectors call between their backbone and their post-processing.
HEAD_MODULES = ("rpn.head", "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_head",
                "roi_heads.mask_predictor", "head")


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):
        return type(obj)((k, _cast_floats(v, dtype)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    return obj


def _to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return _cast_floats(args, dtype)


def _to_fp32(_module: nn.Module, _args: tuple, output: Any) -> Any:
    return _cast_floats(output, torch.float32)


def fp32_heads(detector: nn.Module) -> list[str]:
    """Hooks that make `detector` (a torchvision detector) hand fp32 to everything after its backbone: the
    backbone's output in fp32, each of `HEAD_MODULES` fed in its weights' dtype and returning fp32. Returns the
    head modules found; hooks are not state, so checkpoints and state dicts are unchanged."""
    detector.backbone.register_forward_hook(_to_fp32)
    found = []
    for path in HEAD_MODULES:
        try:
            module = detector.get_submodule(path)
        except AttributeError:
            continue
        module.register_forward_pre_hook(_to_weight_dtype)
        module.register_forward_hook(_to_fp32)
        found.append(path)
    if not found:
        raise ValueError(f"{type(detector).__name__}: none of the detector heads {HEAD_MODULES} found")
    return found


class Detector(nn.Module):
    """A torchvision detector behind the mona_dist batch contract.

    train mode: `model(batch)` -> {"loss": total, <each torchvision loss>}.
    eval mode:  `model(batch)` -> one dict per image (boxes xyxy, scores, labels, [masks (N,1,H0,W0) probs]) in
    the image's original pixels.
    """

    def __init__(self, detector: nn.Module, mask_thresh: float = 0.5, preprocessor: DataPreprocessor | None = None):
        super().__init__()
        self.preprocess = preprocessor or DataPreprocessor()
        self.mask_thresh = mask_thresh  # for evaluation: binarises pasted mask probabilities
        if not isinstance(detector.transform, PrenormalizedTransform):
            detector.transform = PrenormalizedTransform()
        fp32_heads(detector)
        self.detector = detector

    @property
    def backbone(self) -> nn.Module:
        """The mona_dist Backbone (inside the FPN wrapper)."""
        return self.detector.backbone.body

    def forward(self, batch: dict) -> dict | list[dict]:
        images, targets = self.preprocess.detection(batch)
        if self.training:
            losses = self.detector(images, [{"boxes": t["boxes"], "labels": t["labels"], **_masks(t)} for t in targets])
            return {"loss": sum(losses.values()), **losses}
        detections = self.detector(images)
        sizes = [tuple(img.shape[-2:]) for img in images]
        orig = sizes if targets is None else [tuple(int(v) for v in t["orig_size"]) for t in targets]
        return self.detector.transform.to_original(detections, sizes, orig)


def _masks(target: dict) -> dict:
    return {"masks": target["masks"]} if "masks" in target else {}


def predict_dataset(model: Callable[[dict], list[dict]], loader) -> Iterator[tuple[dict, dict, tuple[int, int]]]:
    """(target, prediction in original pixels, (h, w) of the image as loaded -- the pixels its target's boxes are
    in) per image of this rank's share of `loader`.

    `model(batch)` runs in eval mode on the right device: the trainer passes its engine, which moves and casts the
    batch; targets are read from the loader's own (CPU) batch.
    """
    for batch, preds in scored_batches(model, loader):
        yield from zip(batch["targets"], preds, [tuple(img.shape[-2:]) for img in batch["images"]])


def gather_to_main(items: list) -> list | None:
    """Concatenate every rank's `items` on rank 0 (None elsewhere); the list itself when not distributed."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return items
    parts = [None] * torch_dist.get_world_size() if torch_dist.get_rank() == 0 else None
    torch_dist.gather_object(items, parts, dst=0)
    return None if parts is None else [x for part in parts for x in part]
