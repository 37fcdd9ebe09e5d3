"""mmdet's RetinaNet on mona_dist backbones, and the VOC07 11-point mAP against a hand-computed case and against
mmdet's own `eval_map` (the official metric)."""

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


def _random_case(seed: int, images: int = 12, classes: int = 3):
    """Detections and ground truth with overlaps, duplicates, difficult boxes, empty images and tied scores."""
    rng = np.random.default_rng(seed)
    dets, gts = [], []
    for _ in range(images):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (n, 2)).round(1)
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2)).round(1)], 1)
        gts.append(_img(boxes, rng.integers(1, classes + 1, n), rng.random(n) < 0.2))
        picks = rng.integers(0, max(n, 1), int(rng.integers(0, 8)))
        jitter = rng.normal(0, 4, (len(picks), 4))
        dboxes = (boxes[picks] + jitter) if n else rng.uniform(0, 100, (len(picks), 4))
        dboxes = np.concatenate([dboxes[:, :2], np.maximum(dboxes[:, 2:], dboxes[:, :2] + 1)], 1)
        labels = gts[-1]["labels"][picks] if n else rng.integers(1, classes + 1, len(picks))
        labels = np.where(rng.random(len(picks)) < 0.2, rng.integers(1, classes + 1, len(picks)), labels)
        dets.append(_img(dboxes, labels, scores=rng.choice([0.3, 0.5, 0.7, 0.9], len(picks))
                         if seed % 2 else rng.random(len(picks))))
    return dets, gts


@pytest.mark.parametrize("seed", range(6))
def test_voc07_map_equals_mmdets_eval_map(seed):
    """mmdet's eval_map with the arithmetic of mmdet 2.11's VOC evaluation (no +1, 11 points) is the official
    metric; voc_map must give the same number (float32 arithmetic as mmdet's; tied scores included)."""
    from mona_dist.tasks import mmcv_compat

    mmcv_compat.install()
    from mmdet.evaluation.functional import eval_map

    dets, gts = _random_case(seed)
    det_results = [[np.concatenate([d["boxes"][d["labels"] == c], d["scores"][d["labels"] == c, None]], 1)
                    .astype(np.float32) for c in (1, 2, 3)] for d in dets]
    annotations = [{"bboxes": g["boxes"][~g["difficult"]].astype(np.float32), "labels": g["labels"][~g["difficult"]] - 1,
                    "bboxes_ignore": g["boxes"][g["difficult"]].astype(np.float32),
                    "labels_ignore": g["labels"][g["difficult"]] - 1} for g in gts]
    want, per_class = eval_map(det_results, annotations, iou_thr=0.5, logger="silent", nproc=1,
                               use_legacy_coordinate=False, eval_mode="11points")
    got = voc_map(dets, gts, num_classes=3)
    assert got["eval/voc_mAP"] == pytest.approx(want * 100, rel=1e-6, abs=1e-6)
    for c, r in enumerate(per_class, start=1):
        if r["num_gts"]:
            assert got["ap_per_class"][c] == pytest.approx(float(r["ap"]), abs=1e-7)
    assert 0 < got["eval/voc_mAP"] < 100


def test_retinanet_is_mmdets_on_stages_1_to_3_plus_p6_p7():
    model = build_retinanet("swin_nano_patch4_window7", "mona", 2, dict(fpn_channels=32, feat_channels=32))
    from mmdet.models import FocalLoss, L1Loss, RetinaHead, RetinaNet

    net = model.net
    assert type(net) is RetinaNet and isinstance(net.bbox_head, RetinaHead)
    assert net.neck.in_channels == [64, 128, 256] and net.neck.add_extra_convs == "on_input"
    assert model.backbone.out_indices == (1, 2, 3)  # stage 0 runs but has no (unused) output norm
    head = net.bbox_head
    assert isinstance(head.loss_cls, FocalLoss) and (head.loss_cls.gamma, head.loss_cls.alpha) == (2.0, 0.25)
    assert isinstance(head.loss_bbox, L1Loss) and head.prior_generator.strides == [(s, s) for s in (8, 16, 32, 64, 128)]
    assert head.prior_generator.num_base_priors == [9] * 5
    feats = net.extract_feat(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [8, 4, 2, 1, 1]  # strides 8..128
    losses = model(det_batches(0, 2, 2, with_masks=False)[0])
    assert set(losses) == {"loss", "loss_cls", "loss_bbox"}
    losses["loss"].backward()
    assert head.retina_cls.weight.grad.abs().sum() > 0


def test_difficult_boxes_are_left_out_of_training_targets():
    model = build_retinanet("swin_nano_patch4_window7", "fixed", 2, dict(fpn_channels=32, feat_channels=32))
    target = {"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 5.0, 20.0, 20.0]]), "labels": torch.tensor([1, 2]),
              "difficult": torch.tensor([False, True])}
    _, samples = model.data_samples([torch.zeros(3, 32, 32)], [target])
    assert samples[0].gt_instances.labels.tolist() == [0]
    assert samples[0].gt_instances.bboxes.tolist() == [[0.0, 0.0, 9.0, 9.0]]


def test_evaluation_scores_at_the_original_size():
    """A model answering the ground truth in original pixels (twice the input) scores 100; in input pixels, not."""
    batches = det_batches(0, 4, 2, with_masks=False)

    def oracle(scale):
        return lambda batch: [{"boxes": t["boxes"] * scale, "scores": torch.ones(len(t["labels"])),
                               "labels": t["labels"]} for t in batch["targets"]]

    assert evaluate_voc(oracle(2.0), batches, 2)["eval/voc_mAP"] == pytest.approx(100.0)
    assert evaluate_voc(oracle(1.0), batches, 2)["eval/voc_mAP"] < 50.0
