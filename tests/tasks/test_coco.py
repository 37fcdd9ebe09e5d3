"""mmdet's Cascade Mask R-CNN on mona_dist backbones, the batch boundary, and the COCO evaluation path:
predictions -> RLE -> COCOeval."""

from pathlib import Path

import numpy as np
import pytest
import torch
from dense_data import det_batches
from pycocotools import mask as mask_util

from mona_dist.config import load_config
from mona_dist.tasks import TASKS
from mona_dist.tasks.coco import build_cascade, coco_metrics, evaluate_coco, to_coco_results

TINY = dict(fpn_channels=32, conv_channels=32, fc_channels=64, mask_channels=32, anchor_scale=4,
            rpn_proposals_train=100, rpn_proposals_test=50, rcnn_samples=32)
CATEGORY_IDS = [3, 7]  # contiguous labels 1, 2 -> COCO ids with a gap, as in COCO
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _gt_and_perfect_predictions():
    """Two 40x48 images with rectangles; predictions equal to the ground truth (boxes, masks, labels)."""
    gt = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    preds = []
    for image_id, objs in ((1, [(1, 4, 6, 20, 30), (2, 22, 10, 44, 26)]), (2, [(2, 0, 0, 16, 12)])):
        gt["images"].append({"id": image_id, "height": 40, "width": 48})
        boxes, masks = [], []
        for label, x1, y1, x2, y2 in objs:
            m = np.zeros((40, 48), dtype=np.uint8)
            m[y1:y2, x1:x2] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[label - 1],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(m.sum()), "iscrowd": 0, "segmentation": rle,
            })
            boxes.append([x1, y1, x2, y2])
            masks.append(torch.from_numpy(m).bool())
        preds.append((image_id, {
            "boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.ones(len(objs)),
            "labels": torch.tensor([o[0] for o in objs]), "masks": torch.stack(masks),
        }))
    return gt, preds


def test_perfect_predictions_score_100_and_wrong_or_none_score_0():
    gt, preds = _gt_and_perfect_predictions()
    results = [r for image_id, p in preds for r in to_coco_results(p, image_id, CATEGORY_IDS)]
    assert {r["category_id"] for r in results} == {3, 7}
    assert isinstance(results[0]["segmentation"]["counts"], str)
    assert results[0]["bbox"] == [4.0, 6.0, 16.0, 24.0]  # xywh
    perfect = coco_metrics(gt, results)
    for key in ("eval/bbox_AP", "eval/bbox_AP50", "eval/segm_AP", "eval/segm_AP75"):
        assert perfect[key] == pytest.approx(100.0), key

    assert coco_metrics(gt, []) == {f"eval/{t}_{n}": 0.0 for t in ("bbox", "segm") for n in ("AP", "AP50", "AP75")}
    # right places, wrong classes: COCOeval runs and gives 0
    swapped = [dict(r, category_id=10 - r["category_id"]) for r in results]
    wrong = coco_metrics(gt, swapped)
    assert wrong["eval/bbox_AP"] == 0.0 and wrong["eval/segm_AP"] == 0.0
    # half the objects found: strictly between
    half = coco_metrics(gt, [r for r in results if r["image_id"] == 1])
    assert 0.0 < half["eval/bbox_AP"] < 100.0
    # COCOeval's AP is the mean over categories (and IoU thresholds 0.5:0.95) of the precision interpolated at the
    # 101 recall points 0, 0.01, ..., 1. Image 1's two objects are found exactly, image 2's one (category 7) is not.
    # Category 3: its one object found, precision 1 at every recall point: 1. Category 7: one of its two objects
    # found (score 1), so precision 1 up to recall 0.5 (points 0..0.50, 51 of 101) and 0 beyond: 51/101. Boxes and
    # masks are exact, so the same at every IoU threshold and for both.
    want = 100 * (1 + 51 / 101) / 2
    for key in ("eval/bbox_AP", "eval/bbox_AP50", "eval/bbox_AP75", "eval/segm_AP", "eval/segm_AP50", "eval/segm_AP75"):
        assert half[key] == pytest.approx(want, rel=1e-9), key


def test_the_coco_task_builds_the_official_cascade_mask_rcnn():
    cfg = load_config(CONFIGS / "cpu" / "coco.yaml")
    model = TASKS.get("coco").build_model(cfg)
    from mmdet.models import CascadeRCNN, ConvFCBBoxHead, FCNMaskHead, GIoULoss, RPNHead
    from mmdet.models.necks import FPN
    net = model.net
    assert type(net) is CascadeRCNN and isinstance(net.neck, FPN) and isinstance(net.rpn_head, RPNHead)
    assert net.neck.num_outs == 5 and net.neck.in_channels == model.backbone.out_channels == [32, 64, 128, 256]
    roi = net.roi_head
    assert roi.num_stages == 3 and roi.stage_loss_weights == [1, 0.5, 0.25]
    assert [type(h) for h in roi.bbox_head] == [ConvFCBBoxHead] * 3 and len(roi.mask_head) == 3
    assert all(isinstance(h, FCNMaskHead) for h in roi.mask_head)
    first = roi.bbox_head[0]
    assert (first.num_shared_convs, first.num_shared_fcs, first.reg_class_agnostic, first.reg_decoded_bbox) == \
        (4, 1, False, True)
    assert isinstance(first.loss_bbox, GIoULoss) and first.loss_bbox.loss_weight == 10.0
    assert [list(h.bbox_coder.stds) for h in roi.bbox_head] == [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                                                                 [0.033, 0.033, 0.067, 0.067]]
    # SyncBN is CUDA-only: BN on CPU (norm: auto)
    assert type(first.shared_convs[0].bn) is torch.nn.BatchNorm2d
    assert [a.pos_iou_thr for a in (roi.bbox_assigner[i] for i in range(3))] == [0.5, 0.6, 0.7]
    assert roi.bbox_roi_extractor[0].roi_layers[0].aligned and roi.mask_roi_extractor[0].roi_layers[0].output_size == (14, 14)


def test_cascade_losses_and_predictions_at_original_size():
    model = build_cascade("swin_nano_patch4_window7", "mona", 2, TINY)
    batch = det_batches(0, 2, 2, size=64)[0]
    losses = model(batch)
    for stage in range(3):
        assert {f"s{stage}_loss_cls", f"s{stage}_loss_bbox", f"s{stage}_loss_mask"} <= set(losses)
    assert {"loss", "loss_rpn_cls", "loss_rpn_bbox"} <= set(losses)
    assert all(v.shape == () for v in losses.values())  # scalars, as the loop expects (mmdet's mask loss is (1,))
    total = sum(v for k, v in losses.items() if k != "loss" and "loss" in k)
    torch.testing.assert_close(losses["loss"], total)
    losses["loss"].backward()
    assert model.backbone.trunk.layers[0].blocks[0].post_attn.project1.weight.grad is not None
    assert model.net.roi_head.mask_head[2].conv_logits.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        preds = model(batch)
    assert len(preds) == 2
    for p in preds:
        n = len(p["scores"])
        assert p["masks"].shape == (n, 128, 128) and p["masks"].dtype == torch.bool  # orig_size is twice the input
        assert p["labels"].min() >= 1 and p["labels"].max() <= 2  # our labels, 1..K
        if n:
            assert p["boxes"][:, 2:].max() <= 128 and p["boxes"].min() >= 0


def test_batches_become_det_data_samples_at_one_boundary():
    model = build_cascade("swin_nano_patch4_window7", "fixed", 2, TINY)
    images = [torch.randn(3, 40, 70), torch.randn(3, 64, 30)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([2]),
                "masks": torch.ones(1, 40, 70, dtype=torch.uint8), "orig_size": (80, 140)},
               {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]),
                "masks": torch.ones(1, 64, 30, dtype=torch.uint8), "orig_size": (64, 30)}]
    inputs, samples = model.data_samples(images, targets)
    assert inputs.shape == (2, 3, 64, 96)  # padded to /32
    torch.testing.assert_close(inputs[0, :, :40, :70], images[0])
    assert inputs[0, :, 40:].abs().sum() == 0 and inputs[1, :, :, 30:].abs().sum() == 0
    first = samples[0].metainfo
    assert first["img_shape"] == (40, 70) and first["ori_shape"] == (80, 140) and first["scale_factor"] == (0.5, 0.5)
    assert first["pad_shape"] == (64, 96) and first["batch_input_shape"] == (64, 96)
    assert samples[0].gt_instances.labels.tolist() == [1]  # mmdet counts classes from 0
    assert samples[1].gt_instances.masks.masks.shape == (1, 64, 30)
    model.eval()
    assert "gt_instances" not in model.data_samples(images, targets)[1][0]


def test_vit_cascade_uses_the_pyramid():
    model = build_cascade("vit_nano_patch16", "mona", 2, TINY)
    feats = model.net.extract_feat(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1]
    assert torch.isfinite(model(det_batches(0, 2, 2)[0])["loss"])


def test_evaluation_maps_labels_and_gathers_results():
    """evaluate_coco over a loader: an oracle answering in original pixels scores 100 box and mask AP."""
    batches = det_batches(0, 4, 2)

    def upscaled(t):
        return torch.nn.functional.interpolate(t["masks"][:, None].float(), scale_factor=2.0)[:, 0].bool()

    gt = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    for t in (t for b in batches for t in b["targets"]):
        gt["images"].append({"id": t["image_id"], "height": 128, "width": 128})
        for label, m in zip(t["labels"], upscaled(t).to(torch.uint8).numpy()):
            rle = mask_util.encode(np.asfortranarray(m))
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": t["image_id"], "iscrowd": 0, "area": float(m.sum()),
                "category_id": CATEGORY_IDS[int(label) - 1], "bbox": mask_util.toBbox(rle).tolist(),
                "segmentation": dict(rle, counts=rle["counts"].decode()),
            })

    def oracle(batch):
        return [{"boxes": t["boxes"] * 2, "scores": torch.ones(len(t["labels"])), "labels": t["labels"],
                 "masks": upscaled(t)} for t in batch["targets"]]

    metrics = evaluate_coco(oracle, batches, gt, CATEGORY_IDS)
    assert metrics["eval/bbox_AP"] == pytest.approx(100.0) and metrics["eval/segm_AP"] == pytest.approx(100.0)
    assert evaluate_coco(oracle, batches, gt, CATEGORY_IDS[::-1])["eval/bbox_AP"] == 0.0  # labels -> wrong ids
