"""The mmcv.ops stand-in: installed only without compiled ops, numerically mmcv's ops, enough for mmseg."""

import sys

import pytest
import torch
import torch.nn.functional as F

from mona_dist.tasks import mmseg_compat


def test_shim_installs_only_when_compiled_ops_are_missing(monkeypatch):
    monkeypatch.delitem(sys.modules, "mmcv.ops", raising=False)
    monkeypatch.setattr(mmseg_compat, "compiled_ops_available", lambda: True)
    assert mmseg_compat.install() is False
    assert "mmcv.ops" not in sys.modules

    monkeypatch.setattr(mmseg_compat, "compiled_ops_available", lambda: False)
    assert mmseg_compat.install() is True
    shim = sys.modules["mmcv.ops"]
    assert shim.point_sample is mmseg_compat.point_sample
    assert mmseg_compat.install() is True  # idempotent
    assert sys.modules["mmcv.ops"] is shim


def test_this_environment_has_no_compiled_mmcv_ops():
    # If this fails, full mmcv got installed and the shim is not used at all (which is fine: drop this test).
    assert mmseg_compat.compiled_ops_available() is False


def test_point_sample_matches_hand_computation():
    feat = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    # (x, y) in [0, 1]^2; pixel centres of a 2x2 map sit at 0.25 / 0.75 (align_corners=False).
    points = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.25]]])
    out = mmseg_compat.point_sample(feat, points)
    assert out.shape == (1, 1, 5)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 1.0, 2.0, 1.5, 0.5]))
    grid = mmseg_compat.point_sample(feat, points.view(1, 5, 1, 2))
    assert grid.shape == (1, 1, 5, 1)


def test_sigmoid_focal_loss_follows_mmcv_semantics():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    target = torch.tensor([1, 3])  # index 3 = no class: every column is a negative
    gamma, alpha = 2.0, 0.25
    p = torch.sigmoid(logits)
    onehot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    pos = -alpha * (1 - p) ** gamma * torch.log(p)
    neg = -(1 - alpha) * p**gamma * torch.log(1 - p)
    expected = torch.where(onehot.bool(), pos, neg)
    torch.testing.assert_close(mmseg_compat.sigmoid_focal_loss(logits, target, gamma, alpha, None, "none"), expected)
    # mmcv's "mean" divides the sum by the number of rows.
    torch.testing.assert_close(mmseg_compat.sigmoid_focal_loss(logits, target), expected.sum() / 2)
    w = torch.tensor([1.0, 2.0, 3.0])
    weighted = mmseg_compat.sigmoid_focal_loss(logits[:1], target[:1], gamma, alpha, w, "sum")
    torch.testing.assert_close(weighted, expected[0].sum() * 2.0)


def test_missing_ops_raise_what_mmseg_guards_against():
    mmseg_compat.install()
    ops = sys.modules["mmcv.ops"]
    with pytest.raises(ModuleNotFoundError, match="CrissCrossAttention"):
        ops.CrissCrossAttention
    with pytest.raises(ImportError):
        from mmcv.ops import PSAMask  # noqa: F401
    with pytest.raises(AttributeError):
        ops.__wrapped__
    assert not hasattr(ops, "__path__")


def test_mmseg_models_import_and_uperhead_loss_runs():
    mmseg_compat.import_mmseg_models()
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    torch.manual_seed(0)
    head = MODELS.build(
        dict(
            type="UPerHead",
            in_channels=[8, 16, 32, 64],
            in_index=[0, 1, 2, 3],
            pool_scales=(1, 2, 3, 6),
            channels=16,
            num_classes=4,
            norm_cfg=dict(type="BN"),
            align_corners=False,
            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        )
    )
    feats = [torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 4, (1, 64, 64)))) for _ in range(2)]
    losses = head.loss(feats, samples, None)
    assert set(losses) == {"loss_ce", "acc_seg"}
    assert torch.isfinite(losses["loss_ce"]) and losses["loss_ce"] > 0.5  # ~ln(4) at init
    losses["loss_ce"].backward()
    assert head.conv_seg.weight.grad.abs().sum() > 0
    # a loss that goes through the shim's sigmoid_focal_loss import path is importable too
    from mmseg.models.losses import focal_loss

    assert focal_loss._sigmoid_focal_loss is mmseg_compat.sigmoid_focal_loss
