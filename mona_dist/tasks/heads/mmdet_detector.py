"""mmdet detectors behind the mona_dist batch contract: the one place our batches become mmdet data samples.

`build_detector(cfg)` builds a detector config (CascadeRCNN, RetinaNet, ...) through mmdet's registry, with our
backbone as `type="mmseg.MonaSwin"` (`mmseg_registry`), and applies mmdet's own weight init (its runner would
call `init_weights()`; our backbone keeps timm's init or its pretrained weights: it has no init_cfg).
`MMDetDetector` then runs it on our batches:

- `DataPreprocessor.detection` resizes each uint8 image (and its boxes and masks) to the size the worker drew and
  normalises it on the device, as mmdet's Resize + Normalize; the images are padded (bottom/right, zeros after
  normalisation) to a common batch divisible by 32, as mmdet's DetDataPreprocessor / `Pad(size_divisor=32)`.
- each image becomes a `DetDataSample`: `img_shape` the resized size, `pad_shape` that size rounded up to /32,
  `batch_input_shape`, `ori_shape` the original image (`orig_size`) and `scale_factor` (w, h) between them, so
  `predict(..., rescale=True)` returns boxes and pasted masks in original pixels. Training targets become
  `gt_instances` with labels 0..K-1 (ours are 1..K) and `BitmapMasks`; boxes marked `difficult` (VOC) are left
  out, as the official mmdet 2.x VOC runs put them in `gt_bboxes_ignore`, which their pipeline never collected.
- losses come back as mmdet names them (`s0.loss_cls`, `loss_rpn_bbox`, ...; lists summed per key, as mmengine's
  `parse_losses`), "loss" their total; predictions as one dict per image with `boxes` (xyxy, original pixels),
  `scores`, `labels` 1..K and, for instance segmentation, `masks` bool (N, H0, W0).

Precision boundary (`fp32_heads`): the backbone and neck run in the compute dtype; the neck's maps leave in fp32,
each head module (RPN head, each box and mask head, a dense head) is fed in its weights' dtype and hands back fp32,
so anchors, box decoding, NMS, RoIAlign, assigners and losses all see fp32 -- where the official apex O1 runs put
them with mmdet 2.x's `force_fp32`. torchvision's nms / roi_align have no bf16 kernels, and `batched_nms` offsets
each class's boxes by the largest coordinate: bf16 cannot tell 20 020 from 20 030.

Weights never load through mmengine's `load_checkpoint` (it fails on torch >= 2.6, `weights_only`): the backbone
reads them with mona_dist's loader (`pretrained=`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.distributed as torch_dist
from torch import nn

from mona_dist.data.preprocess import DataPreprocessor
from mona_dist.host_sync import to_numpy
from mona_dist.tasks.base import scored_batches

from .. import mmcv_compat


def build_detector(cfg: dict) -> nn.Module:
    """An mmdet detector from its config dict, initialised as mmdet's runner would (not on the meta device)."""
    mmcv_compat.import_models("mmdet")
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict

    from .. import mmseg_registry  # noqa: F401  (registers MonaSwin / MonaViT / SimpleFeaturePyramid in mmseg)

    from mmengine.logging import MMLogger

    net = MODELS.build(ConfigDict(cfg))
    if not any(p.is_meta for p in net.parameters()):  # init_weights reads every parameter for its report
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)  # the report is one INFO record per parameter
        try:
            net.init_weights()
        finally:
            logger.setLevel(level)
    return net


def backbone_config(backbone: str, method: str, *, pretrained: str | None = None, out_indices=None,
                    drop_path_rate: float = 0.0, method_options: dict | None = None,
                    swin_arithmetic: str = "official") -> tuple[dict, list[int], list[int]]:
    """(the mmdet config of our backbone, its out_channels, its out_strides): `mmseg.MonaSwin` / `mmseg.MonaViT`,
    as an mmdet config would name a backbone registered in mmseg's scope."""
    from ...models import backbone_spec, build_backbone

    out_indices = tuple(out_indices) if out_indices is not None else None
    swin = backbone_spec(backbone).family == "swin"
    cfg = dict(type="mmseg.MonaSwin" if swin else "mmseg.MonaViT", arch=backbone, method=method,
               pretrained=pretrained, out_indices=out_indices, drop_path_rate=drop_path_rate,
               method_options=method_options or {}, swin_arithmetic=swin_arithmetic)
    # Channels without building the weights: a meta-device build costs a fraction of a second even for Swin-L.
    with torch.device("meta"):
        probe = build_backbone(backbone, method, out_indices=out_indices, **(method_options or {}))
    return cfg, list(probe.out_channels), list(probe.out_strides)


def head_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the weighted head modules an mmdet detector calls between its neck and its decoding."""
    found = [(name, getattr(net, name)) for name in ("rpn_head", "bbox_head") if getattr(net, name, None) is not None]
    roi = getattr(net, "roi_head", None)
    for attr in ("bbox_head", "mask_head"):
        head = getattr(roi, attr, None) if roi is not None else None
        if isinstance(head, nn.ModuleList):  # one per cascade stage
            found += [(f"roi_head.{attr}.{i}", m) for i, m in enumerate(head)]
        elif head is not None:
            found.append((f"roi_head.{attr}", head))
    return found


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):
        return type(obj)((k, _cast_floats(v, dtype)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    return obj


def _to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return _cast_floats(args, next(module.parameters()).dtype)


def _to_fp32(_module: nn.Module, _args: tuple, output: Any) -> Any:
    return _cast_floats(output, torch.float32)


def fp32_heads(net: nn.Module) -> list[str]:
    """Hooks that put `net`'s heads behind the fp32 boundary (module docstring); returns the head paths. Hooks are
    not state: checkpoints and state dicts are unchanged."""
    heads = head_modules(net)
    if not heads or getattr(net, "neck", None) is None:
        raise ValueError(f"{type(net).__name__}: no neck or none of the heads rpn_head / bbox_head / roi_head found")
    net.neck.register_forward_hook(_to_fp32)
    for _, module in heads:
        module.register_forward_pre_hook(_to_weight_dtype)
        module.register_forward_hook(_to_fp32)
    return [path for path, _ in heads]


def _pad32(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


class MMDetDetector(nn.Module):
    """An mmdet detector (`net`) behind the mona_dist batch contract (module docstring).

    train mode: `model(batch)` -> {"loss": total, <each mmdet loss>}.
    eval mode:  `model(batch)` -> one dict per image (boxes, scores, labels 1..K, [masks]) in original pixels.
    """

    def __init__(self, net: nn.Module, preprocessor: DataPreprocessor | None = None, size_divisor: int = 32):
        super().__init__()
        self.preprocess = preprocessor or DataPreprocessor()
        self.net = net
        self.size_divisor = size_divisor
        self.with_masks = bool(getattr(net, "with_mask", False))
        fp32_heads(net)

    @property
    def backbone(self) -> nn.Module:
        """The mona_dist Backbone (inside the mmseg-registered wrapper)."""
        return self.net.backbone.body

    def forward(self, batch: dict) -> dict | list[dict]:
        images, targets = self.preprocess.detection(batch)
        inputs, samples = self.data_samples(images, targets)
        if self.training:
            raw = self.net.loss(inputs, samples)
            # mmengine's parse_losses: each entry (a tensor, some of shape (1,), or a list of them) to a scalar mean
            losses = {k: sum(x.mean() for x in v) if isinstance(v, (list, tuple)) else v.mean() for k, v in raw.items()}
            out = {"loss": sum(v for k, v in losses.items() if "loss" in k)}
            return out | {k.replace(".", "_"): v for k, v in losses.items()}
        with warnings.catch_warnings():  # mmdet's mask paste copies a tensor with new_tensor (its own warning)
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            results = self.net.predict(inputs, samples, rescale=True)
        return [self.prediction(s.pred_instances) for s in results]

    def data_samples(self, images: list[torch.Tensor], targets: list[dict] | None) -> tuple[torch.Tensor, list]:
        """Normalised images at their model sizes -> (padded batch, DetDataSamples): the one conversion."""
        from mmdet.structures import DetDataSample
        from mmdet.structures.mask import BitmapMasks
        from mmengine.structures import InstanceData

        d = self.size_divisor
        height, width = _pad32(max(im.shape[-2] for im in images), d), _pad32(max(im.shape[-1] for im in images), d)
        inputs = images[0].new_zeros((len(images), 3, height, width))
        samples = []
        for i, im in enumerate(images):
            h, w = im.shape[-2:]
            inputs[i, :, :h, :w] = im
            t = targets[i] if targets is not None else {}
            h0, w0 = (int(v) for v in t.get("orig_size", (h, w)))
            sample = DetDataSample(metainfo=dict(
                img_shape=(h, w), ori_shape=(h0, w0), scale_factor=(w / w0, h / h0),
                pad_shape=(_pad32(h, d), _pad32(w, d)), batch_input_shape=(height, width)))
            if self.training:
                keep = ~t["difficult"].bool() if "difficult" in t else slice(None)
                gt = InstanceData(bboxes=t["boxes"][keep].float(), labels=t["labels"][keep] - 1)
                if self.with_masks:
                    # mmdet 3.3 crops the target masks on the host (BitmapMasks, numpy), as in the official runs:
                    # one deliberate device -> host copy per image and step
                    gt.masks = BitmapMasks(to_numpy(t["masks"][keep], "mmdet_gt_masks"), h, w)
                sample.gt_instances = gt
            samples.append(sample)
        return inputs, samples

    @staticmethod
    def prediction(pred) -> dict:
        out = {"boxes": pred.bboxes.float(), "scores": pred.scores.float(), "labels": pred.labels + 1}
        if "masks" in pred:
            out["masks"] = pred.masks.bool()
        return out


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
