"""Pascal VOC detection: mmdet's RetinaNet on a mona_dist backbone (stages 1-3), VOC07 11-point mAP.

The model is the official Mona VOC config (`Swin-Transformer-Object-Detection/mona_configs/swin-l_voc/
voc_retinanet_swin_large_1x_*.py`), built through mmdet 3.3's registry: FPN over Swin stages 1-3 (strides
8/16/32, start_level 0) plus P6/P7 from the last input map (`add_extra_convs='on_input'`); RetinaHead with 4
stacked convs, anchors octave base 4 x 3 scales x ratios 0.5/1/2 on strides 8-128, focal loss (gamma 2, alpha
0.25) and L1 on deltas; MaxIoUAssigner 0.5 / 0.4; test nms_pre 1000, score 0.05, NMS 0.5, 100 per image.

The metric is the official one: mmdet 2.11's `VOCDataset.evaluate(metric='mAP')` on VOC2007 test, which is
`eval_map(..., iou_thr=0.5, dataset='voc07')` -- `tpfp_default` matching and the 11-point AP, in plain pixel
coordinates (no devkit "+1": mmdet 2.x dropped it; mmdet 3.x's VOCMetric puts it back, `use_legacy_coordinate`).
`voc_map` follows it step by step (tests/tasks/test_voc.py holds it against mmdet 3.3's `eval_map`, which keeps
the same arithmetic with `use_legacy_coordinate=False, eval_mode='11points'`): per class and image, detections in
score order take the ground-truth box of highest IoU (difficult boxes, mmdet's `bboxes_ignore`, listed after the
others) if IoU >= 0.5; a difficult or an already matched box makes the detection neither / a false positive;
detections of all images are then ranked by score, and AP is the mean over recall thresholds 0, 0.1, ..., 1 of
the highest precision at a recall at least that. mAP averages the classes with ground truth.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..data.preprocess import DataPreprocessor, resize_target
from ..models import backbone_spec
from .base import register_task
from .dense import DenseTask
from .heads.mmdet_detector import MMDetDetector, backbone_config, build_detector, gather_to_main, predict_dataset


class VocHeadOptions(BaseModel):
    """`model.head` of a voc config. Defaults are the official RetinaNet (the widths shrink for CPU runs)."""

    model_config = ConfigDict(extra="forbid")

    fpn_channels: int = Field(256, gt=0)
    feat_channels: int = Field(256, gt=0)  # the head towers' width
    stacked_convs: int = Field(4, ge=0)
    octave_base_scale: int = Field(4, gt=0)  # anchor side = octave_base_scale x stride x 2^(k/3), k = 0, 1, 2
    # GroupNorm(32) in the head towers; off in the papers' RetinaNet (the CPU config turns it on to learn fast).
    group_norm: bool = False
    nms_pre: int = Field(1000, gt=0)
    score_thresh: float = Field(0.05, ge=0.0, le=1.0)
    detections_per_img: int = Field(100, gt=0)


def retinanet_config(backbone: dict, channels: list[int], num_classes: int, head: VocHeadOptions) -> dict:
    """The mmdet RetinaNet config: what the official config file reads, in mmdet 3.x keys."""
    c = head.fpn_channels
    norm = dict(norm_cfg=dict(type="GN", num_groups=32, requires_grad=True)) if head.group_norm else {}
    return dict(
        type="RetinaNet",
        backbone=backbone,
        neck=dict(type="FPN", in_channels=channels, out_channels=c, start_level=0, add_extra_convs="on_input",
                  num_outs=5),
        bbox_head=dict(
            type="RetinaHead", num_classes=num_classes, in_channels=c, stacked_convs=head.stacked_convs,
            feat_channels=head.feat_channels, **norm,
            anchor_generator=dict(type="AnchorGenerator", octave_base_scale=head.octave_base_scale,
                                  scales_per_octave=3, ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        train_cfg=dict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
            allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=head.nms_pre, min_bbox_size=0, score_thr=head.score_thresh,
                      nms=dict(type="nms", iou_threshold=0.5), max_per_img=head.detections_per_img),
    )


def build_retinanet(
    backbone: str,
    method: str,
    num_classes: int,
    head: VocHeadOptions | dict | None = None,
    preprocessor: DataPreprocessor | None = None,
    **backbone_kwargs,
) -> MMDetDetector:
    """RetinaNet for `num_classes` object classes (our labels 1..K; mmdet's 0..K-1 inside) on Swin stages 1-3."""
    head = head if isinstance(head, VocHeadOptions) else VocHeadOptions.model_validate(head or {})
    if backbone_spec(backbone).family != "swin":
        raise ValueError(f"RetinaNet takes a Swin backbone (stages 1-3), got {backbone!r}")
    # Only stages 1-3 leave the backbone: stage 0's output norm would be an unused parameter under DDP.
    backbone_kwargs["out_indices"] = backbone_kwargs.get("out_indices") or (1, 2, 3)
    bb, channels, _ = backbone_config(backbone, method, **backbone_kwargs)
    if len(channels) != 3:
        raise ValueError(f"RetinaNet's FPN takes 3 Swin stages (out_indices 1-3), got {len(channels)}")
    return MMDetDetector(build_detector(retinanet_config(bb, channels, num_classes, head)), preprocessor)


# ---- VOC07 mAP (mmdet 2.11 eval_map, dataset='voc07') ------------------------------------------------------------

_EPS = np.finfo(np.float32).eps


def box_overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (n, m) of xyxy boxes in float32, widths x2 - x1 (mmdet's `bbox_overlaps`, union floored at 1e-6)."""
    a, b = a.astype(np.float32).reshape(-1, 4), b.astype(np.float32).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.maximum(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0)
    h = np.maximum(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0)
    overlap = w * h
    return overlap / np.maximum(area_a[:, None] + area_b[None, :] - overlap, np.float32(1e-6))


def _tp_fp(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray, ignore: np.ndarray, iou_thresh: float):
    """One image, one class: (tp, fp) per detection, in the detections' own order (mmdet's `tpfp_default`)."""
    tp, fp = np.zeros(len(boxes), np.float32), np.zeros(len(boxes), np.float32)
    if len(gt) == 0:
        fp[:] = 1
        return tp, fp
    ious = box_overlaps(boxes, gt)
    best, which = ious.max(axis=1), ious.argmax(axis=1)
    covered = np.zeros(len(gt), dtype=bool)
    for i in np.argsort(-scores):
        if best[i] >= iou_thresh:
            j = which[i]
            if not ignore[j]:
                if covered[j]:
                    fp[i] = 1
                else:
                    covered[j], tp[i] = True, 1
        else:
            fp[i] = 1
    return tp, fp


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point interpolated AP, as mmdet's `average_precision(mode='11points')` (its thresholds, float32 sum)."""
    ap = np.float32(0)
    for t in np.arange(0, 1 + 1e-3, 0.1):
        kept = precision[recall >= t]
        ap += kept.max() if kept.size > 0 else 0
    return float(np.float32(ap / 11))


def voc_map(detections: list[dict], ground_truth: list[dict], num_classes: int, iou_thresh: float = 0.5) -> dict:
    """VOC07 mAP in percent. Index i of both lists is one image.

    detections[i]: boxes (N,4) xyxy, scores (N,), labels (N,) in 1..K. ground_truth[i]: boxes, labels, difficult.
    Returns {"eval/voc_mAP": ..., "ap_per_class": {label: AP}}.
    """
    aps = {}
    for c in range(1, num_classes + 1):
        tps, fps, scores, npos = [], [], [], 0
        for d, g in zip(detections, ground_truth):
            mine, hard = g["labels"] == c, np.asarray(g["difficult"], dtype=bool)
            gt = np.concatenate([g["boxes"][mine & ~hard], g["boxes"][mine & hard]]).reshape(-1, 4)
            ignore = np.arange(len(gt)) >= int((mine & ~hard).sum())
            npos += int((mine & ~hard).sum())
            sel = d["labels"] == c
            tp, fp = _tp_fp(d["boxes"][sel], d["scores"][sel], gt, ignore, iou_thresh)
            tps.append(tp), fps.append(fp), scores.append(np.asarray(d["scores"][sel], dtype=np.float32))
        if npos == 0:
            continue
        order = np.argsort(-np.concatenate(scores))
        tp, fp = np.cumsum(np.concatenate(tps)[order]), np.cumsum(np.concatenate(fps)[order])
        aps[c] = voc07_ap(tp / np.maximum(npos, _EPS), tp / np.maximum(tp + fp, _EPS))
    mean = float(np.array(list(aps.values()), dtype=np.float32).mean()) * 100 if aps else 0.0
    return {"eval/voc_mAP": mean, "ap_per_class": aps}


def _numpy(d: dict, keys: tuple[str, ...]) -> dict:
    return {k: d[k].detach().cpu().numpy() for k in keys}


@torch.no_grad()
def evaluate_voc(model, loader, num_classes: int, iou_thresh: float = 0.5) -> dict[str, float]:
    """Every rank predicts its share; rank 0 gathers (detections, ground truth) per image and scores VOC07 mAP."""
    mine = []
    for target, pred, size in predict_dataset(model, loader):
        # Ground truth comes in the pixels of the image as loaded, predictions in the original's: score at the original.
        orig = tuple(int(v) for v in target["orig_size"])
        gt_boxes = resize_target({"boxes": target["boxes"].float()}, size, orig)["boxes"]
        gt = {"boxes": gt_boxes.cpu().numpy(), "labels": target["labels"].cpu().numpy()}
        gt["difficult"] = target["difficult"].cpu().numpy().astype(bool)
        mine.append((_numpy(pred, ("boxes", "scores", "labels")), gt))
    gathered = gather_to_main(mine)
    if gathered is None:
        return {}
    result = voc_map([d for d, _ in gathered], [g for _, g in gathered], num_classes, iou_thresh)
    return {"eval/voc_mAP": result["eval/voc_mAP"]}


@register_task("voc")
class VocTask(DenseTask):
    """Pascal VOC detection; `model.num_classes` defaults to the train shards' class list."""

    head_options = VocHeadOptions
    builder = staticmethod(build_retinanet)

    def evaluate(self, model, loader, dist) -> dict[str, float]:
        classes = loader.shards.classes
        if not classes:
            raise ValueError(f"{loader.shards.spec}: the val shards' index has no class list")
        return evaluate_voc(model, loader, len(classes))
