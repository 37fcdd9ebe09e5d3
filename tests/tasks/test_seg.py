"""UperNet segmentation on mona_dist backbones and the mIoU metric (mmseg's IoUMetric arithmetic)."""

import pytest
import torch

from mona_dist.tasks.heads.pyramid import SimpleFeaturePyramid
from mona_dist.tasks.seg import (
    SegHeadOptions,
    areas_to_metrics,
    batch_areas,
    build_segmentor,
    evaluate_segmentation,
    segmentor_config,
)

from dense_data import seg_batches

TINY_HEAD = dict(channels=32, aux_channels=16)


def test_upernet_swin_forward_loss_and_prediction_shapes():
    model = build_segmentor("swin_nano_patch4_window7", "mona", 3, TINY_HEAD)
    batch = seg_batches(0, 2, 2, size=64, num_classes=2)[0]
    out = model(batch)
    assert set(out) == {"loss", "decode_loss_ce", "decode_acc_seg", "aux_loss_ce", "aux_acc_seg"}
    assert all(v.dim() == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], out["decode_loss_ce"] + out["aux_loss_ce"])
    out["loss"].backward()
    named = dict(model.named_parameters())
    monas = [n for n in named if ".post_attn." in n or ".post_mlp." in n or "my_module" in n]
    assert monas and all(named[n].grad is not None for n in monas), "every Mona parameter gets a gradient"
    frozen = [n for n, p in named.items() if n.startswith("net.backbone.body.trunk") and not p.requires_grad]
    assert frozen and all(named[n].grad is None for n in frozen)
    assert named["net.decode_head.conv_seg.weight"].grad.abs().sum() > 0
    assert model.backbone is model.net.backbone.body

    model.eval()
    with torch.no_grad():
        pred = model({"images": batch["images"][:, :, :48, :40]})
    assert pred.shape == (2, 48, 40) and pred.dtype == torch.int64 and int(pred.max()) < 3


def test_upernet_vit_adds_the_pyramid_neck_and_slides():
    head = dict(TINY_HEAD, inference="slide", crop_size=(32, 32), stride=(16, 16))
    model = build_segmentor("vit_nano_patch16", "mona", 3, head)
    assert isinstance(model.net.neck, SimpleFeaturePyramid)
    feats = model.net.extract_feat(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]  # strides 4/8/16/32 from four stride-16 maps
    assert torch.isfinite(model(seg_batches(0, 2, 2)[0])["loss"])
    model.eval()
    with torch.no_grad():
        assert model({"images": torch.randn(1, 3, 64, 80)}).shape == (1, 64, 80)


def test_config_follows_the_swin_l_upernet_recipe():
    cfg = segmentor_config("swin_large_patch4_window7_224", "mona", 150, SegHeadOptions(), drop_path_rate=0.2)
    dh, aux = cfg.decode_head, cfg.auxiliary_head
    assert cfg.backbone.type == "MonaSwin" and cfg.backbone.drop_path_rate == 0.2 and cfg.neck is None
    assert dh.type == "UPerHead" and dh.in_channels == [192, 384, 768, 1536] and tuple(dh.pool_scales) == (1, 2, 3, 6)
    assert dh.channels == 512 and dh.num_classes == 150 and dh.loss_decode.loss_weight == 1.0
    assert aux.type == "FCNHead" and aux.in_index == 2 and aux.in_channels == 768 and aux.loss_decode.loss_weight == 0.4
    assert dh.ignore_index == aux.ignore_index == 255
    with pytest.raises(ValueError, match="channels"):
        SegHeadOptions.model_validate({"channels": 0})
    with pytest.raises(ValueError, match="extra"):
        SegHeadOptions.model_validate({"chanels": 64})


def test_miou_hand_case():
    label = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 2]])
    areas = batch_areas(pred, label, 3)
    torch.testing.assert_close(areas[0], torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))  # intersections
    m = areas_to_metrics(areas)
    assert m["eval/mIoU"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3 * 100)
    assert m["eval/aAcc"] == pytest.approx(80.0)
    assert m["eval/mAcc"] == pytest.approx((0.5 + 1 + 1) / 3 * 100)
    # a class absent from labels and predictions is left out of the mean, as in mmseg
    assert areas_to_metrics(batch_areas(pred, label, 4))["eval/mIoU"] == pytest.approx(m["eval/mIoU"])
    perfect = areas_to_metrics(batch_areas(label.clamp(max=2), label, 3))
    assert perfect["eval/mIoU"] == 100.0 and perfect["eval/aAcc"] == 100.0


def test_eval_scores_at_the_original_size_like_mmseg():
    """With the eval pipeline's keys, padding is cut and logits resized to orig_size before the argmax."""
    model = build_segmentor("swin_nano_patch4_window7", "mona", 3, TINY_HEAD).eval()
    images = torch.zeros(2, 3, 48, 40)
    batch = {"images": images, "img_sizes": [(48, 40), (30, 40)], "orig_size": [(96, 80), (15, 20)]}
    with torch.no_grad():
        preds = model(batch)
        full = model({"images": images})
    assert [tuple(p.shape) for p in preds] == [(96, 80), (15, 20)]
    assert full.shape == (2, 48, 40)  # inputs not divisible by 32 are padded and cropped back
    labels = [torch.zeros(96, 80, dtype=torch.long), torch.full((15, 20), 255)]
    out = evaluate_segmentation(model, [{**batch, "masks": torch.zeros(2, 48, 40), "orig_masks": labels}], 3)
    # only the first image's pixels count (the second is all ignore), all of class 0
    assert out["eval/aAcc"] == pytest.approx(float((preds[0] == 0).float().mean() * 100))
