"""Semantic segmentation (ADE20K): mmseg's UperNet on a mona_dist backbone, mIoU with mmseg's IoUMetric.

The model is mmseg's own `EncoderDecoder` (UPerHead, pool scales 1/2/3/6, + an FCNHead on stage 3 with loss
weight 0.4, CrossEntropyLoss ignoring 255), built from the registry with our `MonaSwin` / `MonaViT` backbones and,
for ViT, the `SimpleFeaturePyramid` neck: the configuration of the papers' mmseg runs. `SegModel` adapts it to the
mona_dist batch contract. Evaluation sums mmseg's per-class areas over every rank's share, then all-reduces them,
so the metric is exactly the single-process one.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal

import torch
import torch.distributed as torch_dist
from mmengine.config import ConfigDict
from mmengine.model import initialize
from pydantic import BaseModel, ConfigDict as PydanticConfig, Field
import torch.nn.functional as F
from torch import nn

from ..data.preprocess import DataPreprocessor
from ..models import backbone_spec, build_backbone
from . import mmcv_compat
from .base import register_task, scored_batches, unwrap
from .dense import DenseTask
from .heads.pyramid import needs_pyramid


class SegHeadOptions(BaseModel):
    """`model.head` of a seg config. Defaults are the Swin-L UperNet recipe (mmseg `upernet_swin`)."""

    model_config = PydanticConfig(extra="forbid")

    channels: int = Field(512, gt=0)
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    aux_channels: int = Field(256, gt=0)
    aux_weight: float = Field(0.4, ge=0.0)  # 0 drops the auxiliary head
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # SyncBN is the recipe; torch's SyncBatchNorm is CUDA-only, so "auto" uses BN on CPU.
    norm: Literal["auto", "SyncBN", "BN"] = "auto"
    inference: Literal["whole", "slide"] = "whole"
    crop_size: tuple[int, int] = (512, 512)  # slide inference window
    stride: tuple[int, int] = (341, 341)
    ignore_index: int = 255


def segmentor_config(
    backbone: str,
    method: str,
    num_classes: int,
    head: SegHeadOptions,
    *,
    pretrained: str | None = None,
    drop_path_rate: float = 0.0,
    out_indices: list[int] | None = None,
    method_options: dict | None = None,
    swin_arithmetic: str = "official",
) -> ConfigDict:
    """The mmseg `EncoderDecoder` config: what one would write in an mmseg config file."""
    family = backbone_spec(backbone).family
    bb_cfg = dict(
        type="MonaSwin" if family == "swin" else "MonaViT",
        arch=backbone,
        method=method,
        pretrained=pretrained,
        out_indices=out_indices,
        drop_path_rate=drop_path_rate,
        method_options=method_options or {},
        swin_arithmetic=swin_arithmetic,
    )
    # Channels without building the weights: a meta-device build costs a fraction of a second even for Swin-L.
    with torch.device("meta"):
        probe = build_backbone(backbone, method, out_indices=out_indices, **(method_options or {}))
    channels, strides = probe.out_channels, probe.out_strides
    if len(channels) != 4:
        raise ValueError(f"UperNet needs 4 backbone outputs, {backbone} gives {len(channels)} (model.out_indices)")
    neck = None
    if needs_pyramid(strides):
        neck = dict(type="SimpleFeaturePyramid", in_channels=channels, in_stride=strides[0])
    norm = head.norm if head.norm != "auto" else ("SyncBN" if torch.cuda.is_available() else "BN")
    norm_cfg = dict(type=norm, requires_grad=True)
    ce = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=False)
    cfg = dict(
        type="EncoderDecoder",
        backbone=bb_cfg,
        neck=neck,
        decode_head=dict(
            type="UPerHead",
            in_channels=channels,
            in_index=[0, 1, 2, 3],
            pool_scales=head.pool_scales,
            channels=head.channels,
            dropout_ratio=head.dropout,
            num_classes=num_classes,
            norm_cfg=norm_cfg,
            align_corners=False,
            ignore_index=head.ignore_index,
            loss_decode=ce,
        ),
        auxiliary_head=None
        if head.aux_weight == 0
        else dict(
            type="FCNHead",
            in_channels=channels[2],
            in_index=2,
            channels=head.aux_channels,
            num_convs=1,
            concat_input=False,
            dropout_ratio=head.dropout,
            num_classes=num_classes,
            norm_cfg=norm_cfg,
            align_corners=False,
            ignore_index=head.ignore_index,
            loss_decode={**ce, "loss_weight": head.aux_weight},
        ),
        train_cfg=dict(),
        test_cfg=dict(mode=head.inference, crop_size=head.crop_size, stride=head.stride),
    )
    return ConfigDict(cfg)


class SegModel(nn.Module):
    """mmseg `EncoderDecoder` behind the mona_dist batch contract.

    train mode: `model({"images", "masks"})` -> {"loss", "decode_loss_ce", "aux_loss_ce", "decode_acc_seg", ...}.
    eval mode:  `model({"images", ...})` -> predicted labels (B, H, W) int64 at the input size; with the eval
    pipeline's "img_sizes" and "orig_size", a list of (H0, W0) label maps at the original size instead (logits
    cropped to the unpadded image, resized bilinearly, then argmax: mmseg's `postprocess_result`).
    """

    def __init__(self, net: nn.Module, ignore_index: int = 255, preprocessor: DataPreprocessor | None = None):
        super().__init__()
        self.preprocess = preprocessor or DataPreprocessor()
        self.net = net
        self.num_classes = net.num_classes
        self.ignore_index = ignore_index
        self.size_divisor = 32

    @property
    def backbone(self) -> nn.Module:
        """The mona_dist Backbone."""
        return self.net.backbone.body

    def forward(self, batch: dict) -> dict[str, torch.Tensor] | torch.Tensor | list[torch.Tensor]:
        images, masks, valid = self.preprocess.segmentation(batch)  # training windows are resized here
        h0, w0 = images.shape[-2:]
        # Pad to /32 (mmseg's SegDataPreProcessor size_divisor): the trunk needs sizes divisible by its patch and
        # every stage of a 4-level pyramid; padding is cut off the logits again below.
        pad = (0, -w0 % self.size_divisor, 0, -h0 % self.size_divisor)
        images = F.pad(images, pad, value=0.0)
        shape = tuple(images.shape[-2:])
        meta = dict(ori_shape=shape, img_shape=shape, pad_shape=shape, padding_size=[0, 0, 0, 0])
        if not self.training:
            logits = self.net.inference(images, [dict(meta) for _ in range(len(images))])
            if "orig_size" not in batch:
                return logits[:, :, :h0, :w0].argmax(1)
            sizes = valid or [(h0, w0)] * len(images)
            return [
                F.interpolate(lg[None, :, :h, :w], size=tuple(o), mode="bilinear", align_corners=False)[0].argmax(0)
                for lg, (h, w), o in zip(logits, sizes, batch["orig_size"])
            ]
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample

        masks = F.pad(masks.long(), pad, value=self.ignore_index)
        samples = [SegDataSample(gt_sem_seg=PixelData(data=m[None]), metainfo=meta) for m in masks]
        raw = self.net.loss(images, samples)
        out = {k.replace(".", "_"): v.reshape(()) for k, v in raw.items()}
        out["loss"] = sum(v for k, v in out.items() if "loss" in k)
        return out


def build_segmentor(
    backbone: str,
    method: str,
    num_classes: int,
    head: SegHeadOptions | dict | None = None,
    preprocessor: DataPreprocessor | None = None,
    **backbone_kwargs,
) -> SegModel:
    """UperNet (+ aux FCN head) on `backbone` tuned by `method`, built through mmseg's registry."""
    head = head if isinstance(head, SegHeadOptions) else SegHeadOptions.model_validate(head or {})
    mmcv_compat.import_models("mmseg")
    from mmseg.registry import MODELS

    from . import mmseg_registry  # noqa: F401  (registers MonaSwin / MonaViT / SimpleFeaturePyramid)

    with warnings.catch_warnings():
        # mmseg warns on every CrossEntropyLoss that avg_non_ignore=False (that *is* the recipe) and on its own
        # build_loss.
        warnings.filterwarnings("ignore", message=".*(avg_non_ignore|build_loss).*")
        net = MODELS.build(segmentor_config(backbone, method, num_classes, head, **backbone_kwargs))
    # mmseg's runner would call net.init_weights(): for these heads that is their init_cfg (conv_seg ~ N(0, 0.01);
    # ConvModules init themselves when built). Applied directly: init_weights also reads every parameter's value
    # for a report, which fails on the meta device. Our backbones keep timm's init or their pretrained weights.
    for name in ("decode_head", "auxiliary_head"):
        module = getattr(net, name, None)
        if module is not None and module.init_cfg:
            initialize(module, module.init_cfg)
        if module is not None:
            # Logits leave each head in fp32, whatever the compute dtype (autocast, or DeepSpeed's bf16 weights):
            # the resize to label size, the cross-entropy and the argmax then run in fp32, where mmseg 0.x's fp16
            # put them (force_fp32). conv_seg is the heads' last layer; their forward() is called directly.
            module.conv_seg.register_forward_hook(_fp32_output)
    return SegModel(net, head.ignore_index, preprocessor)


def _fp32_output(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()


# ---- metric ---------------------------------------------------------------------------------------------------


def batch_areas(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """mmseg's per-class (intersect, union, pred, label) areas for a batch, as one (4, K) float64 tensor."""
    from mmseg.evaluation.metrics import IoUMetric

    areas = IoUMetric.intersect_and_union(pred, label, num_classes, ignore_index)
    return torch.stack([a.double() for a in areas])


def areas_to_metrics(areas: torch.Tensor) -> dict[str, float]:
    """Summed areas -> {"eval/mIoU", "eval/aAcc", "eval/mAcc"} in percent, classes absent everywhere ignored (nan)."""
    from mmseg.evaluation.metrics import IoUMetric

    m = IoUMetric.total_area_to_metrics(*areas.cpu(), metrics=["mIoU"])
    return {
        "eval/mIoU": float(torch.tensor(m["IoU"]).nanmean() * 100),
        "eval/aAcc": float(m["aAcc"] * 100),
        "eval/mAcc": float(torch.tensor(m["Acc"]).nanmean() * 100),
    }


@torch.no_grad()
def evaluate_segmentation(
    model: Callable[[dict], Any], loader, num_classes: int, ignore_index: int = 255
) -> dict[str, float]:
    """mIoU/aAcc/mAcc of `model` (in eval mode) over `loader`: each rank sums its areas, then they are all-reduced.

    Scored against "orig_masks" at the original size when the batch has them (the eval pipeline), else "masks".
    """
    areas = torch.zeros(4, num_classes, dtype=torch.float64)
    for batch, preds in scored_batches(model, loader):
        labels = batch["orig_masks"] if "orig_masks" in batch and not torch.is_tensor(preds) else batch["masks"]
        for pred, label in zip(preds, labels):
            areas += batch_areas(pred.cpu(), label.cpu(), num_classes, ignore_index)
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else "cpu"
        reduced = areas.to(device)
        torch_dist.all_reduce(reduced)
        areas = reduced.cpu()
    return areas_to_metrics(areas)


@register_task("seg")
class SegTask(DenseTask):
    """ADE20K-style semantic segmentation; `model.num_classes` defaults to the train shards' class list."""

    head_options = SegHeadOptions
    fixed_shape = True  # training crops are the crop size, or smaller ones padded to /32: a few shapes
    builder = staticmethod(build_segmentor)

    def evaluate(self, model, loader, dist) -> dict[str, float]:
        seg = unwrap(model, SegModel)
        return evaluate_segmentation(model, loader, seg.num_classes, seg.ignore_index)

