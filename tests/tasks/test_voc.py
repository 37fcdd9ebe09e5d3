"""RetinaNet on mona_dist backbones and the VOC07 11-point mAP against a hand-computed case."""

import numpy as np
import pytest
import torch
from dense_data import det_batches

from mona_dist.tasks.voc import build_retinanet, evaluate_voc, voc07_ap, voc_map


def _img(boxes, labels, difficult=None, scores=None):
    d = {"boxes": np.array(boxes, dtype=np.float64).reshape(-1, 4), "labels": np.array(labels, dtype=np.int64)}
    if difficult is not None:
        d["difficult"] = np.array(difficult, dtype=bool)
    if scores is not None:
        d["scores"] = np.array(scores, dtype=np.float64)
    return d


def test_voc07_map_hand_case():
    gt = [
        _img([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 70, 70]], [1, 1, 2], [False, True, False]),
        _img([[0, 0, 10, 10]], [1], [False]),
    ]
    det = [
        # class 1: 0.9 hits A (TP); 0.8 hits the difficult box (ignored); 0.7 hits nothing (FP)
        # class 2: 0.5 is the top half of its box (IoU 200/400 = 0.5, TP); 0.4 overlaps it with IoU 200/600 (FP)
        # class 3 has no ground truth: skipped, as mmdet averages only classes with ground truth
        _img([[0, 0, 10, 10], [20, 20, 30, 30], [80, 80, 90, 90], [50, 50, 70, 60], [50, 60, 70, 80], [0, 0, 5, 5]],
             [1, 1, 1, 2, 2, 3], scores=[0.9, 0.8, 0.7, 0.5, 0.4, 0.99]),
        _img([[0, 0, 10, 10]], [1], scores=[0.6]),  # class 1 at 0.6: hits B (TP)
    ]
    # Class 1: npos 2; ranked TP, ignored, FP, TP -> recall .5 .5 .5 1, precision 1 1 .5 2/3
    #   11-point: t = 0..0.5 -> 1 (6 points), t = 0.6..1 -> 2/3 (5 points)
    ap1 = (6 * 1.0 + 5 * (2 / 3)) / 11
    # Class 2: TP then FP -> precision 1 at recall 1
    ap2 = 1.0
    result = voc_map(det, gt, num_classes=3)
    assert result["ap_per_class"][1] == pytest.approx(ap1)
    assert result["ap_per_class"][2] == pytest.approx(ap2)
    assert 3 not in result["ap_per_class"]
    assert result["eval/voc_mAP"] == pytest.approx((ap1 + ap2) / 2 * 100)


def test_below_threshold_and_duplicates_are_false_positives():
    gt = [_img([[0, 0, 10, 10]], [1], [False])]
    low = [_img([[0, 0, 10, 4.9]], [1], scores=[0.9])]  # IoU 0.49
    assert voc_map(low, gt, 1)["eval/voc_mAP"] == 0.0
    dup = [_img([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 1], scores=[0.9, 0.8])]  # TP then FP: precision 1 at recall 1
    assert voc_map(dup, gt, 1)["eval/voc_mAP"] == pytest.approx(100.0)
    late = [_img([[30, 30, 40, 40], [0, 0, 10, 10]], [1, 1], scores=[0.9, 0.8])]  # FP first: precision 1/2 at recall 1
    assert voc_map(late, gt, 1)["eval/voc_mAP"] == pytest.approx(50.0)
    assert voc07_ap(np.array([0.5]), np.array([1.0])) == pytest.approx(6 / 11)


def test_retinanet_uses_stages_1_to_3_plus_p6_p7():
    model = build_retinanet("swin_nano_patch4_window7", "mona", 2, dict(fpn_channels=32, anchor_base=16))
    feats = model.detector.backbone(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "p6", "p7"]
    assert [f.shape[-1] for f in feats.values()] == [8, 4, 2, 1, 1]  # strides 8..128
    assert model.detector.backbone.fpn.inner_blocks[0][0].in_channels == 64  # stage 1 of the nano Swin
    assert model.backbone.out_indices == (1, 2, 3)  # stage 0 runs but has no (unused) output norm
    losses = model(det_batches(0, 2, 2, with_masks=False)[0])
    assert set(losses) == {"loss", "classification", "bbox_regression"}
    losses["loss"].backward()


def test_evaluation_scores_at_the_original_size():
    """A model answering the ground truth in original pixels (twice the input) scores 100; in input pixels, not."""
    batches = det_batches(0, 4, 2, with_masks=False)

    def oracle(scale):
        return lambda batch: [{"boxes": t["boxes"] * scale, "scores": torch.ones(len(t["labels"])),
                               "labels": t["labels"]} for t in batch["targets"]]

    assert evaluate_voc(oracle(2.0), batches, 2)["eval/voc_mAP"] == pytest.approx(100.0)
    assert evaluate_voc(oracle(1.0), batches, 2)["eval/voc_mAP"] < 50.0
