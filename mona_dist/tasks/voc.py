"""Pascal VOC detection: torchvision RetinaNet + FPN (P3-P7) on a mona_dist backbone, VOC07 11-point mAP.

As the papers' mmdet RetinaNet: the FPN takes backbone stages 1-3 (strides 8/16/32) and adds P6/P7 from the last
input map (torchvision's LastLevelP6P7 uses C5 whenever its width differs from the FPN's, mmdet's
`add_extra_convs='on_input'`). The metric follows the VOC devkit's VOC2007 protocol: per class, detections sorted
by score are matched greedily to unmatched ground truth at IoU >= 0.5; a match with a `difficult` box counts as
neither true nor false positive and difficult boxes are not in the recall denominator; AP is the mean over recall
t in {0, 0.1, ..., 1} of the highest precision at recall >= t. mAP averages the classes that have ground truth.
Boxes are continuous pixel coordinates (no devkit "+1"), so IoU is plain area overlap.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..data.preprocess import DataPreprocessor
from ..models import BACKBONES, build_backbone
from .base import Task, register_task
from .heads import class_count
from .heads.detection import Detector, gather_to_main, predict_dataset
from .heads.fpn import FPNBackbone


class VocHeadOptions(BaseModel):
    """`model.head` of a voc config; everything else is torchvision's RetinaNet default."""

    model_config = ConfigDict(extra="forbid")

    fpn_channels: int = Field(256, gt=0)
    anchor_base: int = Field(32, gt=0)  # anchor size on P3, doubling per level (mmdet: octave base 4 x stride 8)
    # GroupNorm(32) in the head towers (torchvision's RetinaNet v2); off in the papers' mmdet RetinaNet.
    group_norm: bool = False
    score_thresh: float = Field(0.05, ge=0.0, le=1.0)  # as mmdet's test_cfg
    detections_per_img: int = Field(100, gt=0)


def build_retinanet(
    backbone: str,
    method: str,
    num_classes: int,
    head: VocHeadOptions | dict | None = None,
    preprocessor: DataPreprocessor | None = None,
    **backbone_kwargs,
) -> Detector:
    """RetinaNet for `num_classes` object classes (labels 1..K; index 0 stays unused, as torchvision counts)."""
    head = head if isinstance(head, VocHeadOptions) else VocHeadOptions.model_validate(head or {})
    if not BACKBONES.get(backbone).timm_name.startswith("swin"):
        raise ValueError(f"RetinaNet takes a Swin backbone (stages 1-3), got {backbone!r}")
    # Only stages 1-3 leave the backbone: stage 0's output norm would be an unused parameter under DDP.
    backbone_kwargs.setdefault("out_indices", (1, 2, 3))
    body = build_backbone(backbone, method, **backbone_kwargs)
    if len(body.out_channels) != 3:
        raise ValueError(f"RetinaNet's FPN takes 3 Swin stages (out_indices 1-3), got {len(body.out_channels)}")
    # P6/P7 from the last FPN input (C5), as mmdet's add_extra_convs="on_input".
    extra = LastLevelP6P7(body.out_channels[-1], head.fpn_channels)
    fpn = FPNBackbone(body, levels=(0, 1, 2), out_channels=head.fpn_channels, extra=extra)
    base_sizes = [head.anchor_base * 2**i for i in range(5)]  # P3..P7, 3 scales per octave, 3 aspect ratios
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in base_sizes)  # torchvision's rounding
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    norm = partial(nn.GroupNorm, 32) if head.group_norm else None
    model = RetinaNet(
        fpn,
        anchor_generator=anchors,
        head=RetinaNetHead(head.fpn_channels, anchors.num_anchors_per_location()[0], num_classes + 1, norm_layer=norm),
        num_classes=num_classes + 1,
        score_thresh=head.score_thresh,
        detections_per_img=head.detections_per_img,
    )
    return Detector(model, preprocessor=preprocessor)


# ---- VOC07 mAP --------------------------------------------------------------------------------------------------


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point interpolated AP (VOC2007 devkit)."""
    points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def voc_map(detections: list[dict], ground_truth: list[dict], num_classes: int, iou_thresh: float = 0.5) -> dict:
    """VOC07 mAP in percent. Index i of both lists is one image.

    detections[i]: boxes (N,4) xyxy, scores (N,), labels (N,) in 1..K. ground_truth[i]: boxes, labels, difficult.
    Returns {"eval/voc_mAP": ..., "ap_per_class": {label: AP}}.
    """
    aps = {}
    for c in range(1, num_classes + 1):
        gts = [(g["boxes"][g["labels"] == c], g["difficult"][g["labels"] == c]) for g in ground_truth]
        npos = sum(int((~d).sum()) for _, d in gts)
        if npos == 0:
            continue
        cand = [
            (float(s), i, b)
            for i, d in enumerate(detections)
            for s, b in zip(d["scores"][d["labels"] == c], d["boxes"][d["labels"] == c])
        ]
        cand.sort(key=lambda x: -x[0])
        used = [np.zeros(len(b), dtype=bool) for b, _ in gts]
        tp, fp = np.zeros(len(cand)), np.zeros(len(cand))
        for k, (_, i, box) in enumerate(cand):
            gt_boxes, difficult = gts[i]
            if len(gt_boxes) == 0:
                fp[k] = 1
                continue
            ious = box_iou(torch.as_tensor(box[None]).double(), torch.as_tensor(gt_boxes).double())[0]
            j = int(ious.argmax())
            if ious[j] < iou_thresh:
                fp[k] = 1
            elif not difficult[j]:
                if used[i][j]:
                    fp[k] = 1
                else:
                    tp[k], used[i][j] = 1, True
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[c] = voc07_ap(recall, precision)
    mean = float(np.mean(list(aps.values()))) * 100 if aps else 0.0
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
        gt_boxes = resize_boxes(target["boxes"].float(), size, orig)
        gt = {"boxes": gt_boxes.cpu().numpy(), "labels": target["labels"].cpu().numpy()}
        gt["difficult"] = target["difficult"].cpu().numpy().astype(bool)
        mine.append((_numpy(pred, ("boxes", "scores", "labels")), gt))
    gathered = gather_to_main(mine)
    if gathered is None:
        return {}
    result = voc_map([d for d, _ in gathered], [g for _, g in gathered], num_classes, iou_thresh)
    return {"eval/voc_mAP": result["eval/voc_mAP"]}


@register_task("voc")
class VocTask(Task):
    """Pascal VOC detection; `model.num_classes` defaults to the train shards' class list."""

    head_options = VocHeadOptions

    def check(self, cfg) -> None:
        super().check(cfg)
        class_count(cfg)

    def build_model(self, cfg) -> Detector:
        m = cfg.model
        return build_retinanet(
            m.backbone, m.method, class_count(cfg), self.options(cfg), pretrained=m.pretrained,
            drop_path_rate=m.drop_path_rate, out_indices=tuple(m.out_indices) if m.out_indices else (1, 2, 3),
            swin_arithmetic=m.swin_arithmetic, preprocessor=self.preprocessor(cfg), **m.method_options,
        )

    def evaluate(self, model, loader, dist) -> dict[str, float]:
        classes = loader.shards.classes
        if not classes:
            raise ValueError(f"{loader.shards.spec}: the val shards' index has no class list")
        return evaluate_voc(model, loader, len(classes))
