"""The stand-in for mmcv's compiled kernels: mmcv's own op wrappers on torchvision's kernels, checked against
torchvision (and mmcv's legacy nms arithmetic written out here), plus the upstream facts it relies on."""

import ast
import pathlib
import sys

import pytest
import torch
import torchvision

from mona_dist.tasks import mmcv_compat

mmcv_compat.install()
import mmcv.ops  # noqa: E402  (after the stand-in)


def _boxes(gen: torch.Generator, n: int, size: float = 60.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size
    return torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * size / 2 + 0.5], dim=1)


def test_stand_in_is_used_only_without_compiled_ops(monkeypatch):
    assert mmcv_compat.standin() is sys.modules["mmcv._ext"]
    assert mmcv_compat.install() is True  # idempotent: the module registered once stays
    monkeypatch.delitem(sys.modules, "mmcv._ext")
    monkeypatch.setattr(mmcv_compat, "compiled_ext_available", lambda: True)
    assert mmcv_compat.install() is False and "mmcv._ext" not in sys.modules


def test_mmengine_reads_the_stand_in_as_mmcv_lite():
    """mmengine's optimizer constructor asks `mmcv_full_available` (pkgutil.find_loader), which raised
    "mmcv._ext.__spec__ is None" on the stand-in; it must answer as for mmcv-lite."""
    from mmengine.utils.dl_utils import mmcv_full_available

    assert mmcv_compat.standin() is not None and mmcv_full_available() is False


def test_upstream_mmcv_lite_still_ships_no_compiled_extension():
    # If this fails, an mmcv with compiled ops is installed: install() then leaves it alone (drop the stand-in).
    assert mmcv_compat.compiled_ext_available() is False


def _legacy_nms(boxes, scores, thr, offset):
    """mmcv's nms_cpu written out: greedy by score, IoU with widths x2 - x1 + offset, suppress IoU > thr."""
    order = scores.argsort(descending=True).tolist()
    area = (boxes[:, 2] - boxes[:, 0] + offset) * (boxes[:, 3] - boxes[:, 1] + offset)
    keep, dead = [], set()
    for i in order:
        if i in dead:
            continue
        keep.append(i)
        for j in order:
            if j in dead or j == i:
                continue
            w = (torch.minimum(boxes[i, 2], boxes[j, 2]) - torch.maximum(boxes[i, 0], boxes[j, 0]) + offset).clamp(min=0)
            h = (torch.minimum(boxes[i, 3], boxes[j, 3]) - torch.maximum(boxes[i, 1], boxes[j, 1]) + offset).clamp(min=0)
            inter = w * h
            if inter / (area[i] + area[j] - inter) > thr:
                dead.add(j)
    return torch.tensor(keep)


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_offsets(offset):
    gen = torch.Generator().manual_seed(offset)
    boxes, scores = _boxes(gen, 80, size=20.0), torch.rand(80, generator=gen)
    dets, keep = mmcv.ops.nms(boxes, scores, 0.4, offset=offset)
    assert torch.equal(keep, _legacy_nms(boxes, scores, 0.4, offset))
    assert torch.equal(dets[:, 4], scores[keep]) and torch.equal(dets[:, :4], boxes[keep])
    if offset == 0:
        assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.4))
    # per-class NMS as mmdet calls it: mmcv's wrapper, our kernel, torchvision's batched_nms agree
    labels = torch.randint(0, 3, (80,), generator=gen)
    _, kept = mmcv.ops.batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.4))
    if offset == 0:
        assert torch.equal(kept, torchvision.ops.batched_nms(boxes, scores, labels, 0.4))
    assert len(mmcv.ops.nms(boxes[:0], scores[:0], 0.5)[1]) == 0


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
def test_roi_align_forward_and_backward_equal_torchvision(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(sampling_ratio)
    feats = torch.randn(2, 3, 20, 24, generator=gen, dtype=torch.float64)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0], [0.0]]), _boxes(gen, 4, size=40.0)], 1).double()
    x, ref_x = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    layer = mmcv.ops.RoIAlign((7, 6), spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned)
    out = layer(x, rois)
    ref = torchvision.ops.roi_align(ref_x, rois, (7, 6), 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=1e-12)
    assert x.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="roi_align_forward with pool_mode='max'"):
        mmcv.ops.RoIAlign(7, pool_mode="max")(x, rois)


def test_roi_pool_forward_and_backward_equal_torchvision():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 3, 16, 16, generator=gen)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0]]), _boxes(gen, 3, size=25.0)], 1)
    x, ref_x = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    out = mmcv.ops.RoIPool((4, 5), spatial_scale=0.5)(x, rois)
    ref = torchvision.ops.roi_pool(ref_x, rois, (4, 5), 0.5)
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(x.grad, ref_x.grad) and x.grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_loss_forward_and_gradient(reduction):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 2
    target = torch.tensor([0, 1, 2, 3, 3, 1])  # index 3 = no class: every column a negative
    x, ref_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    onehot = torch.nn.functional.one_hot(target, 4)[:, :3].double()
    out = mmcv.ops.sigmoid_focal_loss(x, target, 2.0, 0.25, None, reduction)
    ref = torchvision.ops.sigmoid_focal_loss(ref_x, onehot, alpha=0.25, gamma=2.0, reduction="sum" if reduction ==
                                             "sum" else "none")
    if reduction == "mean":  # mmcv's "mean" divides the sum by the number of rows, not of elements
        ref = ref.sum() / 6
    # the hand formula: -alpha (1-p)^g log p on the target column, -(1-alpha) p^g log(1-p) elsewhere
    p = torch.sigmoid(logits)
    hand = torch.where(onehot.bool(), -0.25 * (1 - p) ** 2 * p.log(), -0.75 * p**2 * (1 - p).log())
    hand = {"none": hand, "mean": hand.sum() / 6, "sum": hand.sum()}[reduction]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, hand, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    # a per-class weight multiplies each row's loss by its target class's weight
    weight = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    weighted = mmcv.ops.sigmoid_focal_loss(logits, target, 2.0, 0.25, weight, "none")
    rows = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(weighted, mmcv.ops.sigmoid_focal_loss(logits, target, 2.0, 0.25, None, "none")
                               * rows[:, None])


def test_a_kernel_the_stand_in_lacks_raises_naming_it():
    conv = mmcv.ops.DeformConv2d(4, 4, 3)
    with pytest.raises(NotImplementedError, match="mmcv._ext.deform_conv_forward"):
        conv(torch.randn(1, 4, 8, 8), torch.zeros(1, 18, 6, 6))
    with pytest.raises(NotImplementedError, match="softmax_focal_loss_forward"):
        mmcv.ops.softmax_focal_loss(torch.randn(2, 3), torch.tensor([0, 1]), 2.0, 0.25, None, "mean")
    with pytest.raises(AttributeError):
        mmcv_compat.standin().__wrapped__


def _imported_from_mmcv_ops(package: str) -> set[tuple[str, str]]:
    root = pathlib.Path(__import__(package).__file__).parent
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmcv.ops"):
                names |= {(node.module, a.name) for a in node.names}
    return names


def test_upstream_kernel_and_op_names_are_the_ones_this_stand_in_was_written_for():
    """If mmcv, mmdet or mmseg change what they ask for, this fails: re-check the stand-in's kernels."""
    requested = set()
    for path in pathlib.Path(mmcv.ops.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load_ext":
                requested |= {e.value for e in node.args[1].elts}
    assert len(requested) == 112 and set(mmcv_compat.PROVIDED) <= requested
    assert set(mmcv_compat.standin().missing_kernels) == requested - set(mmcv_compat.PROVIDED)
    assert _imported_from_mmcv_ops("mmdet") == {
        ("mmcv.ops", n) for n in ("CornerPool", "DeformConv2d", "MaskedConv2d", "MultiScaleDeformableAttention",
                                  "RoIPool", "batched_nms", "deform_conv2d", "nms", "nms_match", "point_sample",
                                  "rel_roi_point_to_rel_img_point", "sigmoid_focal_loss")
    } | {("mmcv.ops.carafe", "CARAFEPack"), ("mmcv.ops.merge_cells", "ConcatCell"),
         ("mmcv.ops.merge_cells", "GlobalPoolingCell"), ("mmcv.ops.merge_cells", "SumCell"),
         ("mmcv.ops.modulated_deform_conv", "ModulatedDeformConv2d"), ("mmcv.ops.nms", "batched_nms"),
         ("mmcv.ops.roi_align", "roi_align")}
    assert _imported_from_mmcv_ops("mmseg") == {("mmcv.ops", n) for n in (
        "CrissCrossAttention", "DeformConv2d", "ModulatedDeformConv2d", "PSAMask", "point_sample",
        "sigmoid_focal_loss")}


def test_mmseg_and_mmdet_models_import_and_uperhead_loss_runs():
    mmcv_compat.import_models("mmdet")
    mmcv_compat.import_models("mmseg")
    from mmengine.structures import PixelData
    from mmseg.models.losses import focal_loss
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    assert focal_loss._sigmoid_focal_loss is mmcv.ops.sigmoid_focal_loss  # mmcv's own wrapper, not a copy
    torch.manual_seed(0)
    head = MODELS.build(dict(type="UPerHead", in_channels=[8, 16, 32, 64], in_index=[0, 1, 2, 3],
                             pool_scales=(1, 2, 3, 6), channels=16, num_classes=4, norm_cfg=dict(type="BN"),
                             align_corners=False,
                             loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)))
    feats = [torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 4, (1, 64, 64)))) for _ in range(2)]
    losses = head.loss(feats, samples, None)
    assert torch.isfinite(losses["loss_ce"]) and losses["loss_ce"] > 0.5  # ~ln(4) at init
    losses["loss_ce"].backward()
    assert head.conv_seg.weight.grad.abs().sum() > 0
