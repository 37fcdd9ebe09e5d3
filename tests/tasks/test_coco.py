"""Mask R-CNN on mona_dist backbones, and the COCO evaluation path: predictions -> RLE -> COCOeval."""

import numpy as np
import pytest
import torch
from dense_data import det_batches
from pycocotools import mask as mask_util

from mona_dist.tasks.coco import build_mask_rcnn, coco_metrics, evaluate_coco, to_coco_results
from mona_dist.tasks.heads.detection import PrenormalizedTransform

TINY = dict(fpn_channels=32, representation_size=64, mask_channels=32, anchor_base=16,
            rpn_post_nms_train=100, rpn_post_nms_test=50, box_batch_size_per_image=32)
CATEGORY_IDS = [3, 7]  # contiguous labels 1, 2 -> COCO ids with a gap, as in COCO


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
            masks.append(torch.from_numpy(m).float()[None])
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


def test_transform_neither_resizes_nor_renormalises():
    t = PrenormalizedTransform().eval()
    images = [torch.randn(3, 37, 50), torch.randn(3, 64, 20)]
    batched, _ = t(images)
    assert batched.image_sizes == [(37, 50), (64, 20)]
    assert batched.tensors.shape[-2:] == (64, 64)  # padded to /32
    torch.testing.assert_close(batched.tensors[0, :, :37, :50], images[0])


def test_mask_rcnn_losses_and_predictions_at_original_size():
    model = build_mask_rcnn("swin_nano_patch4_window7", "mona", 2, TINY)
    batch = det_batches(0, 2, 2, size=64)[0]
    losses = model(batch)
    assert {"loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    losses["loss"].backward()
    assert model.backbone.trunk.layers[0].blocks[0].post_attn.project1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        preds = model(batch)
    assert len(preds) == 2
    for p in preds:
        n = len(p["scores"])
        assert p["masks"].shape == (n, 1, 128, 128)  # orig_size is twice the input
        if n:
            assert p["boxes"][:, 2:].max() <= 128 and p["boxes"].min() >= 0


def test_vit_mask_rcnn_uses_the_pyramid():
    model = build_mask_rcnn("vit_nano_patch16", "mona", 2, TINY)
    feats = model.detector.backbone(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]
    assert torch.isfinite(model(det_batches(0, 2, 2)[0])["loss"])


def test_evaluation_maps_labels_and_gathers_results():
    """evaluate_coco over a loader: an oracle answering in original pixels scores 100 box and mask AP."""
    batches = det_batches(0, 4, 2)

    def upscaled(t):
        return torch.nn.functional.interpolate(t["masks"][:, None].float(), scale_factor=2.0)

    gt = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    for t in (t for b in batches for t in b["targets"]):
        gt["images"].append({"id": t["image_id"], "height": 128, "width": 128})
        for label, m in zip(t["labels"], upscaled(t)[:, 0].to(torch.uint8).numpy()):
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
