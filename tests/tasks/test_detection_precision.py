"""The detectors' fp32 boundary (tasks/heads/mmdet_detector.py): under autocast, decoding and NMS give the fp32
result, and the heads hand back fp32.

mmdet's RetinaNet with its box regression zeroed and every class scored alike predicts every anchor as a box, once
per class: thousands of coincident and overlapping boxes at coordinates of several hundred pixels, where bf16's
step is 2-4 px and batched_nms's per-class offsets (class x (largest coordinate + 1)) are ~10^4. Because the
heads' outputs are then exact in bf16 too, any difference from the fp32 run comes from decoding and NMS.
"""

from __future__ import annotations

import pytest
import torch

from mona_dist.tasks.heads.mmdet_detector import fp32_heads
from mona_dist.tasks.voc import build_retinanet


def duplicating_retinanet():
    torch.manual_seed(0)
    model = build_retinanet("swin_nano_patch4_window7", "mona", 20, {"fpn_channels": 32, "feat_channels": 32,
                                                                      "octave_base_scale": 4, "detections_per_img": 300})
    head = model.net.bbox_head
    with torch.no_grad():
        head.retina_reg.weight.zero_()
        head.retina_reg.bias.zero_()
        head.retina_cls.weight.zero_()
        head.retina_cls.bias.fill_(3.0)  # sigmoid 0.95 for every class at every anchor
    return model.eval()


def predict(model, images, autocast: bool):
    batch = {"images": images, "targets": [{"orig_size": tuple(im.shape[-2:])} for im in images]}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return model(batch)


def test_decoding_and_nms_under_autocast_equal_fp32():
    model = duplicating_retinanet()
    images = [torch.randint(0, 256, (3, 320, 480), dtype=torch.uint8)]
    want, got = predict(model, images, autocast=False)[0], predict(model, images, autocast=True)[0]
    assert len(want["boxes"]) == 300 and want["boxes"].max() > 300  # the case is what it should be
    assert len(set(want["labels"].tolist())) > 5  # the same places kept for several classes
    assert got["boxes"].dtype == got["scores"].dtype == torch.float32
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(got[key], want[key]), key


def test_the_heads_hand_back_fp32_under_autocast():
    model = duplicating_retinanet()
    outputs = {}
    model.net.bbox_head.register_forward_hook(lambda _m, _a, out: outputs.update(cls=out[0], reg=out[1]))
    model.net.neck.register_forward_hook(lambda _m, _a, out: outputs.update(features=list(out)))
    predict(model, [torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)], autocast=True)
    assert all(t.dtype == torch.float32 for t in outputs["cls"] + outputs["reg"] + outputs["features"])


def test_a_detector_without_known_heads_is_refused():
    from torch import nn

    net = nn.Module()
    net.neck = nn.Identity()
    with pytest.raises(ValueError, match="none of the heads"):
        fp32_heads(net)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cascade_trains_under_autocast(precision):
    """The official COCO/VOC runs used fp16 mixed precision: DDP's autocast (fp16 with a grad scaler) trains
    Cascade Mask R-CNN with finite losses, its box heads' outputs in fp32."""
    from dense_data import det_batches

    from mona_dist.config.schema import EngineConfig, OptimConfig
    from mona_dist.engine import build_engine
    from mona_dist.tasks.coco import build_cascade

    torch.manual_seed(0)
    model = build_cascade("swin_nano_patch4_window7", "mona", 2, dict(
        fpn_channels=32, conv_channels=32, fc_channels=64, mask_channels=32, anchor_scale=4,
        rpn_proposals_train=100, rpn_proposals_test=50, rcnn_samples=32))
    engine = build_engine(model, EngineConfig(name="ddp", precision=precision), OptimConfig(lr=1e-3),
                          micro_batch_size=2)
    seen = {}
    model.net.roi_head.bbox_head[2].register_forward_hook(lambda _m, _a, out: seen.update(dtype=out[0].dtype))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    losses = []
    for batch in det_batches(0, 6, 2):
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert seen["dtype"] == torch.float32
    # It trained: AdamW counts the steps it took (a step the fp16 scaler skips for inf/nan gradients is not
    # counted), and the trainable weights moved, all finite.
    taken = max(int(st["step"]) for st in engine.optimizer.state.values()) if engine.optimizer.state else 0
    assert 1 <= taken <= len(losses) and (precision == "fp16" or taken == len(losses)), taken
    moved = [n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > len(trainable) // 2, f"{len(moved)} of {len(trainable)} trainable tensors moved"
    assert all(torch.isfinite(p).all() for p in trainable.values())
