"""Mona fused (one merged depthwise conv) and recomputed (only its input kept for backward) against the plain
official ops: the same outputs and gradients, the same dropout masks, and what autograd keeps per module.

Tolerances. Recomputation alone changes nothing: bit for bit. The fused ops round differently, nothing more: in
float64 they equal the plain ops within 1e-12; in fp32 one module's output and every gradient are within 1e-6
relative (per tensor, ||fused - plain|| / ||plain||), about the distance of either from the float64 result.
Through a whole backbone (16 Monas, the trunk amplifying) fp32 rounding adds up to a few 1e-6, so there the test is
float64 (and fp32 within 1e-5)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from mona_dist.adapters import Mona
from mona_dist.adapters.blocks import Recompute
from mona_dist.engine.activation import enable_activation_checkpointing
from mona_dist.models import build_backbone

PLAIN = {"recompute": False, "fused": False}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _perturb(module: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Every trainable weight moved away from its init (gamma = 1e-6 would hide the norm term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return module


def _step(module, inputs: tuple, seed: int, **kw):
    """Outputs and gradients (inputs first, then every trainable parameter by name) of one training forward and
    backward; dropout draws its masks from `seed`."""
    torch.manual_seed(seed)
    outs = module(*inputs, **kw)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    names = [n.replace("_checkpoint_wrapped_module.", "") for n, p in module.named_parameters() if p.requires_grad]
    wrt = [t for t in inputs if t.requires_grad] + [p for p in module.parameters() if p.requires_grad]
    loss = sum((o * torch.cos(o)).sum() for o in outs)  # a gradient of both signs into every output
    grads = torch.autograd.grad(loss, wrt)
    return [o.detach() for o in outs], dict(zip(["input"] * (len(wrt) - len(names)) + names, grads))


MODULE_CASES = {  # odd grids; ViT tokens with a prefix token on the linear path
    "swin-grid": ((2, 13, 19, 128), {}),
    "vit-tokens": ((2, 1 + 5 * 7, 96), {"hw": (5, 7), "num_prefix_tokens": 1}),
}


@pytest.mark.parametrize("outer", [False, True], ids=["eager", "inside-a-checkpoint"])
@pytest.mark.parametrize("case", MODULE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_one_module_equals_the_plain_ops(case, outer, dtype):
    shape, kw = MODULE_CASES[case]
    torch.manual_seed(0)
    plain = _perturb(Mona(shape[-1], recompute=None, fused=False)).to(dtype).train()
    mona = Mona(shape[-1]).to(dtype).train()
    mona.load_state_dict(plain.state_dict())
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()

    (want,), want_grads = _step(plain, (x,), 5, **kw)
    # outer: as under activation checkpointing, the whole module is recomputed once more in backward
    (got,), grads = _outer(mona, x, kw) if outer else _step(mona, (x,), 5, **kw)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert _rel(got, want) <= tol
    assert set(grads) == set(want_grads) and len(grads) == 1 + 16
    for k in want_grads:
        assert _rel(grads[k], want_grads[k]) <= tol, k
    # the masks are drawn, and replayed: another seed gives another output
    (other,), _ = _step(mona, (x,), 6, **kw)
    assert _rel(other, want) > 1e-3


def _outer(m: Mona, x: torch.Tensor, kw: dict):
    """_step with the module inside a non-reentrant checkpoint (activation checkpointing's own)."""
    torch.manual_seed(5)
    out = checkpoint(m, x, use_reentrant=False, **kw)
    names = [n for n, _ in m.named_parameters()]
    grads = torch.autograd.grad((out * torch.cos(out)).sum(), [x, *m.parameters()])
    return [out.detach()], dict(zip(["input", *names], grads))


BACKBONES = [  # (backbone, input H x W): odd grids at every stage; ViT's cls token on the linear path
    ("swin_nano_patch4_window7", (52, 76)),  # grids 13x19, 7x10, 4x5, 2x3
    ("vit_nano_patch16", (48, 80)),  # 3x5 patch grid + 1 prefix token
]


def _backbone_step(name, options, x, checkpointing, seed=7):
    torch.manual_seed(0)
    bb = _perturb(build_backbone(name, "mona", **options)).to(x.dtype).train()
    if checkpointing:
        enable_activation_checkpointing(bb)
    return _step(bb, (x,), seed)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "checkpointed"])
@pytest.mark.parametrize("name, hw", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_a_backbone_trains_as_with_the_plain_ops(name, hw, checkpointing):
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    want, want_grads = _backbone_step(name, PLAIN, x, checkpointing)
    same, same_grads = _backbone_step(name, {"recompute": True, "fused": False}, x, checkpointing)
    assert all(torch.equal(a, b) for a, b in zip(same, want))  # recomputation alone: bit for bit
    assert all(torch.equal(same_grads[k], want_grads[k]) for k in want_grads)
    got, grads = _backbone_step(name, {}, x, checkpointing)  # the defaults: recomputed and fused
    assert len(grads) == len(want_grads) > 30
    assert max(_rel(a, b) for a, b in zip(got, want)) <= 1e-5  # fp32 rounding through 16 modules and the trunk
    assert max(_rel(grads[k], want_grads[k]) for k in want_grads) <= 1e-5
    x64 = x.double()
    want, want_grads = _backbone_step(name, PLAIN, x64, checkpointing)
    got, grads = _backbone_step(name, {}, x64, checkpointing)
    assert max(_rel(a, b) for a, b in zip(got, want)) <= 1e-12
    worst = max((_rel(grads[k], want_grads[k]), k) for k in want_grads)
    assert worst[0] <= 1e-10, worst


def test_merged_filter_is_the_three_filters_and_the_identity():
    m = Mona(16, kernels=(3, 5, 7))
    w, b = m.adapter_conv.merged_filter()
    p = torch.randn(2, 64, 9, 11)
    convs = [m.adapter_conv.conv1, m.adapter_conv.conv2, m.adapter_conv.conv3]
    with torch.no_grad():
        want = sum(c(p) for c in convs) / 3 + p
        got = torch.nn.functional.conv2d(p, w, b, padding=3, groups=64)
    assert w.shape == (64, 1, 7, 7) and _rel(got, want) <= 1e-6
    torch.testing.assert_close(b, (convs[0].bias + convs[1].bias + convs[2].bias) / 3)


def _kept_bytes(m: Mona, x: torch.Tensor, **kw) -> int:
    """Bytes autograd keeps for backward inside `m` (saved-tensor hooks), plus the inputs its own checkpoint keeps
    (a Recompute module's tensor arguments, as the bench counts them), each storage once; parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def keep_args(_module, args) -> None:
        for a in args:
            if isinstance(a, torch.Tensor):
                keep(a)

    hooks = [r.register_forward_pre_hook(keep_args) for r in m.modules() if isinstance(r, Recompute)]
    with saved_tensors_hooks(keep, lambda t: t):
        out = m(x, **kw)
    for h in hooks:
        h.remove()
    out.sum().backward()  # what was kept is enough
    return sum(kept.values())


@pytest.mark.parametrize("case", MODULE_CASES)
def test_a_mona_keeps_its_input_and_nothing_else(case):
    """What README states: one copy of the module's input (B x N x C x 4 bytes in fp32), where the plain ops keep
    the input, the norm's statistics, two more C-wide tensors and five 64-wide ones (the dropout mask among them)."""
    shape, kw = MODULE_CASES[case]
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    mona = Mona(shape[-1]).train()
    plain = Mona(shape[-1], recompute=None, fused=False).train()
    plain.load_state_dict(mona.state_dict())
    assert _kept_bytes(mona, x, **kw) == x.numel() * 4
    assert _kept_bytes(plain, x, **kw) > 3 * x.numel() * 4
