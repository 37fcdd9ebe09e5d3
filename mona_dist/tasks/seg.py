"""Semantic segmentation (ADE20K): mmseg's UperNet on a mona_dist backbone, mIoU with mmseg's IoUMetric.

The model is mmseg's own `EncoderDecoder` (UPerHead, pool scales 1/2/3/6, + an FCNHead on stage 3 with loss
weight 0.4, CrossEntropyLoss ignoring 255), built from the registry with our `MonaSwin` / `MonaViT` backbones and,
for ViT, the `SimpleFeaturePyramid` neck: the configuration of the papers' mmseg runs. `SegModel` adapts it to the
mona_dist batch contract. Evaluation sums mmseg's per-class areas over every rank's share, then all-reduces them,
so the metric is exactly the single-process one.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
import torch.distributed as torch_dist
from mmengine.config import ConfigDict
from mmengine.logging import MMLogger
from pydantic import BaseModel, ConfigDict as PydanticConfig, Field
from torch import nn

from ..models import BACKBONES, build_backbone
from . import mmseg_compat
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
) -> ConfigDict:
    """The mmseg `EncoderDecoder` config: what one would write in an mmseg config file."""
    family = "swin" if BACKBONES.get(backbone).timm_name.startswith("swin") else "vit"
    bb_cfg = dict(
        type="MonaSwin" if family == "swin" else "MonaViT",
        arch=backbone,
        method=method,
        pretrained=pretrained,
        out_indices=out_indices,
        drop_path_rate=drop_path_rate,
        method_options=method_options or {},
    )
    # Channels without building the weights: a meta-device build costs a fraction of a second even for Swin-L.
    with torch.device("meta"):
        probe = build_backbone(backbone, method, out_indices=out_indices, **(method_options or {}))
    channels, strides = probe.out_channels, probe.out_strides
    if len(channels) != 4:
        raise ValueError(f"UperNet needs 4 backbone outputs, {backbone} gives {len(channels)} (model.out_indices)")
    neck = dict(type="SimpleFeaturePyramid", in_channels=channels, in_stride=strides[0]) if needs_pyramid(strides) else None
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

    train mode: `model({"images", "masks"})` -> {"loss", "decode_loss_ce", "aux_loss_ce", "decode_acc_seg"}.
    eval mode:  `model({"images", ...})` -> predicted labels (B, H, W) int64 at the image size.
    """

    def __init__(self, net: nn.Module, ignore_index: int = 255):
        super().__init__()
        self.net = net
        self.num_classes = net.num_classes
        self.ignore_index = ignore_index

    @property
    def backbone(self) -> nn.Module:
        """The mona_dist Backbone."""
        return self.net.backbone.body

    def forward(self, batch: dict) -> dict[str, torch.Tensor] | torch.Tensor:
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample

        images = batch["images"]
        shape = tuple(images.shape[-2:])
        meta = dict(ori_shape=shape, img_shape=shape, pad_shape=shape, padding_size=[0, 0, 0, 0])
        if not self.training:
            return self.net.inference(images, [dict(meta) for _ in range(len(images))]).argmax(1)
        samples = [SegDataSample(gt_sem_seg=PixelData(data=m[None]), metainfo=meta) for m in batch["masks"]]
        raw = self.net.loss(images, samples)
        out = {k.replace(".", "_"): v.reshape(()) for k, v in raw.items()}
        out["loss"] = sum(v for k, v in out.items() if "loss" in k)
        return out


def build_segmentor(
    backbone: str,
    method: str,
    num_classes: int,
    head: SegHeadOptions | dict | None = None,
    **backbone_kwargs,
) -> SegModel:
    """UperNet (+ aux FCN head) on `backbone` tuned by `method`, built through mmseg's registry."""
    head = head if isinstance(head, SegHeadOptions) else SegHeadOptions.model_validate(head or {})
    mmseg_compat.import_mmseg_models()
    from mmseg.registry import MODELS

    from . import mmseg_registry  # noqa: F401  (registers MonaSwin / MonaViT / SimpleFeaturePyramid)

    with warnings.catch_warnings():
        # mmseg warns on every CrossEntropyLoss that avg_non_ignore=False (that *is* the recipe) and on its own build_loss.
        warnings.filterwarnings("ignore", message=".*(avg_non_ignore|build_loss).*")
        net = MODELS.build(segmentor_config(backbone, method, num_classes, head, **backbone_kwargs))
    # mmseg's runner calls init_weights (conv_seg ~ N(0, 0.01)); our backbones keep timm's init or their
    # pretrained weights (MonaSwin/MonaViT have no init_cfg). Its per-parameter report is silenced.
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        net.init_weights()
    finally:
        logger.setLevel(level)
    return SegModel(net, head.ignore_index)


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
def evaluate_segmentation(model: nn.Module, loader, num_classes: int, ignore_index: int = 255) -> dict[str, float]:
    """Every rank predicts its share of `loader`; areas are all-reduced, so each rank returns the global metrics."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    was_training = model.training
    model.eval()
    areas = torch.zeros(4, num_classes, dtype=torch.float64)
    try:
        for batch in loader:
            images = batch["images"].to(param.device, param.dtype)
            pred = model({"images": images})
            areas += batch_areas(pred, batch["masks"].to(pred.device), num_classes, ignore_index).cpu()
    finally:
        model.train(was_training)
    if torch_dist.is_available() and torch_dist.is_initialized():
        reduced = areas.to(param.device) if torch_dist.get_backend() == "nccl" else areas
        torch_dist.all_reduce(reduced)
        areas = reduced.cpu()
    return areas_to_metrics(areas)
