"""COCO instance segmentation: mmdet's Cascade Mask R-CNN on a mona_dist backbone, box/mask AP by pycocotools.

The model is the official Mona COCO config (`Swin-Transformer-Object-Detection/mona_configs/swin-b_coco/
cascade_mask_swin_base_3x_coco_sample_1_bs_16_*.py` over the Swin fork's `cascade_mask_rcnn_swin_fpn.py`), built
through mmdet 3.3's registry: FPN (P2-P6, max-pool P6) over the 4 backbone stages; RPN (one anchor scale 8,
ratios 0.5/1/2, strides 4-64; sigmoid CE + SmoothL1 beta 1/9); a 3-stage CascadeRoIHead (stage weights 1/0.5/0.25,
IoU 0.5/0.6/0.7) whose box heads are `ConvFCBBoxHead` 4 convs + 1 fc with SyncBN, class-specific GIoU x10 on
decoded boxes (target stds 0.1/0.05/0.033 ... ) and softmax CE, one FCNMaskHead (4 convs, 28x28 targets) per
stage; RoIAlign 7 / 14, sampling ratio 0, aligned. SyncBN is a CUDA op: `norm="auto"` uses BN on CPU. Keys of
mmdet 2.x that mmdet 3.x dropped (`nms_post`, `nms_across_levels`) are left out; `max_per_img` carries the value.

Evaluation maps each prediction back to the original image (`orig_size`), turns labels into COCO category ids and
masks into RLE, gathers every rank's detections on rank 0 and scores them with `COCOeval` against the raw COCO
records, as the official `evaluation = dict(metric=['bbox', 'segm'])`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from typing import Literal

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from pydantic import BaseModel, ConfigDict, Field

from ..data.preprocess import DataPreprocessor
from .base import register_task
from .dense import DenseTask
from .heads.mmdet_detector import MMDetDetector, backbone_config, build_detector, gather_to_main, predict_dataset
from .heads.pyramid import needs_pyramid


class CocoHeadOptions(BaseModel):
    """`model.head` of a coco config. Defaults are the official Cascade Mask R-CNN (the widths shrink for CPU)."""

    model_config = ConfigDict(extra="forbid")

    fpn_channels: int = Field(256, gt=0)
    anchor_scale: int = Field(8, gt=0)  # RPN anchor side = scale x stride (4, 8, ..., 64)
    conv_channels: int = Field(256, gt=0)  # ConvFCBBoxHead's 4 shared convs
    fc_channels: int = Field(1024, gt=0)  # its shared fc
    mask_channels: int = Field(256, gt=0)  # FCNMaskHead's 4 convs
    rpn_proposals_train: int = Field(2000, gt=0)  # nms_pre per level and max_per_img
    rpn_proposals_test: int = Field(1000, gt=0)
    rcnn_samples: int = Field(512, gt=0)  # sampled RoIs per image and stage (a quarter positive at most)
    # SyncBN in the box heads is the recipe; torch's SyncBatchNorm is CUDA-only, so "auto" uses BN on CPU.
    norm: Literal["auto", "SyncBN", "BN"] = "auto"
    score_thresh: float = Field(0.05, ge=0.0, le=1.0)
    detections_per_img: int = Field(100, gt=0)
    mask_thresh: float = Field(0.5, gt=0.0, lt=1.0)  # binarises pasted mask probabilities (mask_thr_binary)


STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_STDS = ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])


def cascade_config(backbone: dict, channels: list[int], strides: list[int], num_classes: int,
                   head: CocoHeadOptions) -> dict:
    """The mmdet CascadeRCNN config: what the official config file reads, in mmdet 3.x keys."""
    if len(channels) != 4:
        raise ValueError(f"Cascade Mask R-CNN's FPN needs 4 backbone outputs, got {len(channels)} (model.out_indices)")
    c = head.fpn_channels
    norm = head.norm if head.norm != "auto" else ("SyncBN" if torch.cuda.is_available() else "BN")
    fpn = dict(type="FPN", in_channels=channels, out_channels=c, num_outs=5)
    neck = [dict(type="mmseg.SimpleFeaturePyramid", in_channels=channels, in_stride=strides[0]), fpn] \
        if needs_pyramid(strides) else fpn
    box_heads = [dict(
        type="ConvFCBBoxHead", num_shared_convs=4, num_shared_fcs=1, in_channels=c, conv_out_channels=head.conv_channels,
        fc_out_channels=head.fc_channels, roi_feat_size=7, num_classes=num_classes,
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds),
        reg_class_agnostic=False, reg_decoded_bbox=True, norm_cfg=dict(type=norm, requires_grad=True),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=10.0)) for stds in STAGE_STDS]
    rcnn_train = [dict(
        assigner=dict(type="MaxIoUAssigner", pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou,
                      match_low_quality=False, ignore_iof_thr=-1),
        sampler=dict(type="RandomSampler", num=head.rcnn_samples, pos_fraction=0.25, neg_pos_ub=-1,
                     add_gt_as_proposals=True),
        mask_size=28, pos_weight=-1, debug=False) for iou in STAGE_IOUS]
    nms = dict(type="nms", iou_threshold=0.7)
    return dict(
        type="CascadeRCNN",
        backbone=backbone,
        neck=neck,
        rpn_head=dict(
            type="RPNHead", in_channels=c, feat_channels=c,
            anchor_generator=dict(type="AnchorGenerator", scales=[head.anchor_scale], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="SmoothL1Loss", beta=1.0 / 9.0, loss_weight=1.0)),
        roi_head=dict(
            type="CascadeRoIHead", num_stages=3, stage_loss_weights=[1, 0.5, 0.25],
            bbox_roi_extractor=dict(type="SingleRoIExtractor", out_channels=c, featmap_strides=[4, 8, 16, 32],
                                    roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0)),
            bbox_head=box_heads,
            mask_roi_extractor=dict(type="SingleRoIExtractor", out_channels=c, featmap_strides=[4, 8, 16, 32],
                                    roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0)),
            mask_head=dict(type="FCNMaskHead", num_convs=4, in_channels=c, conv_out_channels=head.mask_channels,
                           num_classes=num_classes,
                           loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(
                assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                              match_low_quality=True, ignore_iof_thr=-1),
                sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                             add_gt_as_proposals=False),
                allowed_border=0, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=head.rpn_proposals_train, max_per_img=head.rpn_proposals_train, nms=nms,
                              min_bbox_size=0),
            rcnn=rcnn_train),
        test_cfg=dict(
            rpn=dict(nms_pre=head.rpn_proposals_test, max_per_img=head.rpn_proposals_test, nms=nms, min_bbox_size=0),
            rcnn=dict(score_thr=head.score_thresh, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=head.detections_per_img, mask_thr_binary=head.mask_thresh)),
    )


def build_cascade(
    backbone: str,
    method: str,
    num_classes: int,
    head: CocoHeadOptions | dict | None = None,
    preprocessor: DataPreprocessor | None = None,
    **backbone_kwargs,
) -> MMDetDetector:
    """Cascade Mask R-CNN for `num_classes` object classes (our labels 1..K; mmdet's 0..K-1 inside)."""
    head = head if isinstance(head, CocoHeadOptions) else CocoHeadOptions.model_validate(head or {})
    bb, channels, strides = backbone_config(backbone, method, **backbone_kwargs)
    return MMDetDetector(build_detector(cascade_config(bb, channels, strides, num_classes, head)), preprocessor)


# ---- evaluation -----------------------------------------------------------------------------------------------


def to_coco_results(pred: dict, image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's predictions (original pixels, labels 1..K, binary masks (N, H0, W0)) -> COCO result records
    with RLE masks."""
    boxes = pred["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = pred["scores"].detach().float().cpu().tolist()
    cats = [category_ids[int(c) - 1] for c in pred["labels"].cpu()]
    rles: list[dict | None] = [None] * len(scores)
    if "masks" in pred and len(scores):
        binary = pred["masks"].to(torch.uint8).cpu().numpy()
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # JSON/pickle friendly, as COCO result files store it
    out = []
    for box, score, cat, rle in zip(xywh, scores, cats, rles):
        rec = {"image_id": int(image_id), "category_id": cat, "bbox": box, "score": score}
        if rle is not None:
            rec["segmentation"] = rle
        out.append(rec)
    return out


def coco_ground_truth(shard_urls: list[str], categories: list[dict]) -> dict:
    """The instances dict of a val split, rebuilt from the raw COCO records its shards carry (one JSON each).

    Reads the shards directly (no node splitting): every image must be in the ground truth on rank 0.
    """
    import webdataset as wds

    images, annotations = [], []
    for sample in wds.DataPipeline(wds.SimpleShardList(shard_urls), wds.tarfile_to_samples()):
        record = json.loads(sample["json"])
        images.append(record["image"])
        annotations.extend(record["annotations"])
    return {"images": images, "annotations": annotations, "categories": categories}


_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_metrics(
    gt: COCO | dict, results: list[dict], iou_types: tuple[str, ...] = ("bbox", "segm")
) -> dict[str, float]:
    """COCOeval of `results` against `gt` (a COCO object or an instances dict) -> {"eval/bbox_AP", ...} in percent.

    Only images in `gt` are scored. No detection at all gives AP 0 (pycocotools cannot load an empty result list).
    Area-range entries pycocotools marks -1 (no ground truth of that size) are left out.
    """
    if isinstance(gt, dict):
        gt_dict, gt = gt, COCO()
        gt.dataset = gt_dict
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if not results:
            metrics.update({f"eval/{iou_type}_{n}": 0.0 for n in _STAT_NAMES[:3]})
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = sorted(gt.getImgIds())
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for name, value in zip(_STAT_NAMES, ev.stats[:6]):
            if value >= 0:
                metrics[f"eval/{iou_type}_{name}"] = float(value) * 100
    return metrics


@torch.no_grad()
def evaluate_coco(
    model,
    loader,
    gt: COCO | dict | None,
    category_ids: list[int],
    iou_types: tuple[str, ...] = ("bbox", "segm"),
) -> dict[str, float]:
    """Every rank predicts its share; rank 0 gathers all results and runs COCOeval (other ranks return {}).

    `gt` is only read on rank 0; pass None to have rank 0 rebuild it from `loader.shards` (the val shards).
    """
    mine = [
        rec
        for target, pred, _ in predict_dataset(model, loader)
        for rec in to_coco_results(pred, int(target["image_id"]), category_ids)
    ]
    gathered = gather_to_main(mine)
    if gathered is None:
        return {}
    if gt is None:
        gt = _ground_truth_for(tuple(loader.shards.urls), json.dumps(loader.shards.classes))
    return coco_metrics(gt, gathered, iou_types)


@functools.lru_cache(maxsize=2)
def _ground_truth_for(shard_urls: tuple[str, ...], categories: str) -> COCO:
    """Read and index a val split's ground truth once per run, not at every evaluation."""
    gt = COCO()
    gt.dataset = coco_ground_truth(list(shard_urls), json.loads(categories))
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


@register_task("coco")
class CocoTask(DenseTask):
    """COCO instance segmentation; `model.num_classes` defaults to the train shards' class list."""

    head_options = CocoHeadOptions
    builder = staticmethod(build_cascade)

    def evaluate(self, model, loader, dist) -> dict[str, float]:
        categories = loader.shards.classes
        if not categories:
            raise ValueError(f"{loader.shards.spec}: the val shards' index has no COCO category list")
        return evaluate_coco(model, loader, None, [c["id"] for c in categories])
