"""COCO instance segmentation: torchvision Mask R-CNN + FPN on a mona_dist backbone, box/mask AP by pycocotools.

The papers ran mmdet's Cascade Mask R-CNN, which does not build on current torch (mmcv's compiled ops); this is
torchvision's Mask R-CNN with the same FPN (P2-P5 + max-pool P6) over the four backbone stages. Evaluation maps
each prediction back to the original image (`orig_size`), turns labels into COCO category ids and masks into RLE,
gathers every rank's detections on rank 0 and scores them with `COCOeval` against the raw COCO records.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from pydantic import BaseModel, ConfigDict, Field
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..data.preprocess import DataPreprocessor
from ..models import build_backbone
from .base import Task, register_task, unwrap
from .heads import class_count
from .heads.detection import Detector, gather_to_main, predict_dataset
from .heads.fpn import FPNBackbone


class CocoHeadOptions(BaseModel):
    """`model.head` of a coco config. Defaults are torchvision's Mask R-CNN (the widths shrink for CPU runs)."""

    model_config = ConfigDict(extra="forbid")

    fpn_channels: int = Field(256, gt=0)
    anchor_base: int = Field(32, gt=0)  # RPN anchor size on P2, doubling per level, aspect ratios 0.5/1/2
    representation_size: int = Field(1024, gt=0)  # box head MLP width
    mask_channels: int = Field(256, gt=0)  # mask head conv width
    rpn_post_nms_train: int = Field(2000, gt=0)  # proposals kept per image
    rpn_post_nms_test: int = Field(1000, gt=0)
    box_batch_size_per_image: int = Field(512, gt=0)  # sampled RoIs per image for the box loss
    score_thresh: float = Field(0.05, ge=0.0, le=1.0)  # as mmdet's test_cfg
    detections_per_img: int = Field(100, gt=0)
    mask_thresh: float = Field(0.5, gt=0.0, lt=1.0)  # binarises pasted mask probabilities for RLE


def build_mask_rcnn(
    backbone: str,
    method: str,
    num_classes: int,
    head: CocoHeadOptions | dict | None = None,
    preprocessor: DataPreprocessor | None = None,
    **backbone_kwargs,
) -> Detector:
    """Mask R-CNN for `num_classes` object classes (labels 1..K; torchvision adds background 0)."""
    head = head if isinstance(head, CocoHeadOptions) else CocoHeadOptions.model_validate(head or {})
    body = build_backbone(backbone, method, **backbone_kwargs)
    if len(body.out_channels) != 4:
        raise ValueError(f"Mask R-CNN's FPN needs 4 backbone outputs, {backbone} gives {len(body.out_channels)}")
    c = head.fpn_channels
    fpn = FPNBackbone(body, levels=(0, 1, 2, 3), out_channels=c, extra=LastLevelMaxPool())
    model = MaskRCNN(
        fpn,
        num_classes=None,  # given by the predictors below
        rpn_anchor_generator=AnchorGenerator(
            tuple((head.anchor_base * 2**i,) for i in range(5)), ((0.5, 1.0, 2.0),) * 5
        ),
        rpn_post_nms_top_n_train=head.rpn_post_nms_train,
        rpn_post_nms_top_n_test=head.rpn_post_nms_test,
        box_batch_size_per_image=head.box_batch_size_per_image,
        box_head=TwoMLPHead(c * 7 * 7, head.representation_size),
        box_predictor=FastRCNNPredictor(head.representation_size, num_classes + 1),
        mask_head=MaskRCNNHeads(c, [head.mask_channels] * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(head.mask_channels, head.mask_channels, num_classes + 1),
        box_score_thresh=head.score_thresh,
        box_detections_per_img=head.detections_per_img,
    )
    return Detector(model, mask_thresh=head.mask_thresh, preprocessor=preprocessor)


# ---- evaluation -----------------------------------------------------------------------------------------------


def to_coco_results(pred: dict, image_id: int, category_ids: list[int], mask_thresh: float = 0.5) -> list[dict]:
    """One image's predictions (original pixels, labels 1..K) -> COCO result records with RLE masks."""
    boxes = pred["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = pred["scores"].detach().float().cpu().tolist()
    cats = [category_ids[int(c) - 1] for c in pred["labels"].cpu()]
    rles: list[dict | None] = [None] * len(scores)
    if "masks" in pred and len(scores):
        binary = (pred["masks"][:, 0] > mask_thresh).to(torch.uint8).cpu().numpy()
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
    mask_thresh: float = 0.5,
    iou_types: tuple[str, ...] = ("bbox", "segm"),
) -> dict[str, float]:
    """Every rank predicts its share; rank 0 gathers all results and runs COCOeval (other ranks return {}).

    `gt` is only read on rank 0; pass None to have rank 0 rebuild it from `loader.shards` (the val shards).
    """
    mine = [
        rec
        for target, pred, _ in predict_dataset(model, loader)
        for rec in to_coco_results(pred, int(target["image_id"]), category_ids, mask_thresh)
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
class CocoTask(Task):
    """COCO instance segmentation; `model.num_classes` defaults to the train shards' class list."""

    head_options = CocoHeadOptions

    def check(self, cfg) -> None:
        super().check(cfg)
        class_count(cfg)

    def build_model(self, cfg) -> Detector:
        m = cfg.model
        return build_mask_rcnn(
            m.backbone, m.method, class_count(cfg), self.options(cfg), pretrained=m.pretrained,
            drop_path_rate=m.drop_path_rate, out_indices=tuple(m.out_indices) if m.out_indices else None,
            swin_arithmetic=m.swin_arithmetic, preprocessor=self.preprocessor(cfg), **m.method_options,
        )

    def evaluate(self, model, loader, dist) -> dict[str, float]:
        categories = loader.shards.classes
        if not categories:
            raise ValueError(f"{loader.shards.spec}: the val shards' index has no COCO category list")
        thresh = getattr(unwrap(model, Detector), "mask_thresh", 0.5)
        return evaluate_coco(model, loader, None, [c["id"] for c in categories], thresh)
