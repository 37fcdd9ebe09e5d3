"""COCO instance segmentation: torchvision Mask R-CNN + FPN on a mona_dist backbone, box/mask AP by pycocotools.

The papers ran mmdet's Cascade Mask R-CNN, which does not build on current torch (mmcv's compiled ops); this is
torchvision's Mask R-CNN with the same FPN (P2-P5 + max-pool P6) over the four backbone stages. Evaluation maps
each prediction back to the original image (`orig_size`), turns labels into COCO category ids and masks into RLE,
gathers every rank's detections on rank 0 and scores them with `COCOeval` against the raw COCO records.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from pydantic import BaseModel, ConfigDict, Field
from torchvision.models.detection import MaskRCNN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..models import build_backbone
from .heads.detection import Detector, gather_to_main, predict_dataset
from .heads.fpn import FPNBackbone


class CocoHeadOptions(BaseModel):
    """`model.head` of a coco config; everything else is torchvision's Mask R-CNN default."""

    model_config = ConfigDict(extra="forbid")

    fpn_channels: int = Field(256, gt=0)
    score_thresh: float = Field(0.05, ge=0.0, le=1.0)  # as mmdet's test_cfg
    detections_per_img: int = Field(100, gt=0)
    mask_thresh: float = Field(0.5, gt=0.0, lt=1.0)  # binarises pasted mask probabilities for RLE


def build_mask_rcnn(
    backbone: str,
    method: str,
    num_classes: int,
    head: CocoHeadOptions | dict | None = None,
    **backbone_kwargs,
) -> Detector:
    """Mask R-CNN for `num_classes` object classes (labels 1..K; torchvision adds background 0)."""
    head = head if isinstance(head, CocoHeadOptions) else CocoHeadOptions.model_validate(head or {})
    body = build_backbone(backbone, method, **backbone_kwargs)
    if len(body.out_channels) != 4:
        raise ValueError(f"Mask R-CNN's FPN needs 4 backbone outputs, {backbone} gives {len(body.out_channels)}")
    fpn = FPNBackbone(body, levels=(0, 1, 2, 3), out_channels=head.fpn_channels, extra=LastLevelMaxPool())
    model = MaskRCNN(
        fpn,
        num_classes=num_classes + 1,
        box_score_thresh=head.score_thresh,
        box_detections_per_img=head.detections_per_img,
    )
    return Detector(model)


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


def coco_metrics(gt: COCO | dict, results: list[dict], iou_types: tuple[str, ...] = ("bbox", "segm")) -> dict[str, float]:
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
def evaluate_coco(model: torch.nn.Module, loader, gt: COCO | dict, category_ids: list[int], mask_thresh: float = 0.5):
    """Every rank predicts its share; rank 0 gathers all results and runs COCOeval (other ranks return {})."""
    mine = [
        rec
        for target, pred, _ in predict_dataset(model, loader)
        for rec in to_coco_results(pred, int(target["image_id"]), category_ids, mask_thresh)
    ]
    gathered = gather_to_main(mine)
    return {} if gathered is None else coco_metrics(gt, gathered)
