"""The E3VA highway: autograd keeps no activation of the frozen backbone; LoRA-FA keeps not even the taps."""

import pytest
import timm
import torch
from torch.autograd.graph import saved_tensors_hooks

from mona_dist.adapters import apply_method
from mona_dist.adapters.blocks import Recompute
from mona_dist.models import build_backbone


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def saved_tensor_origins(bb, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Run forward and sort every tensor autograd saved for backward by where it came from.

    'trunk': produced inside a frozen-backbone module (qkv, attention, norms, MLP hidden, ...),
    'tap': a tensor the highway's adapters read, 'param': a parameter, 'other': the highway's own tensors.
    """
    produced, taps, keep = set(), set(), []

    def on_output(_m, _i, out):
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                produced.add(_storage(t))
                keep.append(t)  # hold on to it so its memory is not reused by a later tensor

    def on_adapter_input(_m, args):
        taps.add(_storage(args[0]))
        keep.append(args[0])

    hooks = [m.register_forward_hook(on_output) for m in bb.trunk.modules()]
    if bb.highway is not None:
        for mods in (bb.highway.attn_adapters, bb.highway.mlp_adapters):
            hooks += [m.register_forward_pre_hook(on_adapter_input) for m in mods]
    params = {_storage(p) for p in bb.parameters()}
    saved: list[torch.Tensor] = []
    # What a Recompute module keeps are its tensor arguments (its checkpoint hides everything inside).
    hooks += [m.register_forward_pre_hook(lambda _m, args: saved.extend(a for a in args if isinstance(a, torch.Tensor)))
              for m in bb.modules() if isinstance(m, Recompute)]
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = bb(x)
    for h in hooks:
        h.remove()
    origins = {"trunk": [], "tap": [], "param": [], "other": []}
    for t in saved:
        s = _storage(t)
        kind = "param" if s in params else "tap" if s in taps else "trunk" if s in produced else "other"
        origins[kind].append(t)
    assert out[0].requires_grad
    return origins


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("backbone", ["swin_nano_patch4_window7", "vit_nano_patch16"])
@pytest.mark.parametrize("method", ["e3va", "mona_hw"])
def test_highway_saves_no_backbone_activation(backbone, method):
    origins = saved_tensor_origins(build_backbone(backbone, method, lora_fa=False), torch.randn(2, 3, 64, 64))
    assert origins["trunk"] == []
    assert origins["tap"], "the plain highway keeps the taps its adapters read"


@pytest.mark.parametrize("backbone", ["swin_nano_patch4_window7", "vit_nano_patch16"])
@pytest.mark.parametrize("method", ["e3va", "mona_hw"])
def test_lora_fa_keeps_not_even_the_taps(backbone, method):
    x = torch.randn(2, 3, 64, 64)
    opts = {"recompute": False} if method == "mona_hw" else {}  # the highway that keeps what autograd keeps
    plain = saved_tensor_origins(build_backbone(backbone, method, lora_fa=False, **opts), x)
    fa = saved_tensor_origins(build_backbone(backbone, method, lora_fa=True), x)
    assert fa["trunk"] == [] and fa["tap"] == []
    assert _nbytes(fa["other"]) < 0.5 * _nbytes(plain["other"] + plain["tap"])


@pytest.mark.parametrize("method", ["mona", "full"])
def test_the_check_does_catch_backbone_activations_of_block_methods(method):
    origins = saved_tensor_origins(build_backbone("swin_nano_patch4_window7", method), torch.randn(2, 3, 64, 64))
    assert len(origins["trunk"]) > 20


def test_highway_starts_at_the_frozen_backbone_features():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    hw = build_backbone("swin_nano_patch4_window7", "e3va").eval()
    fixed = build_backbone("swin_nano_patch4_window7", "fixed").eval()
    fixed.load_state_dict({k: v for k, v in hw.state_dict().items() if not k.startswith("highway.")})
    for a, b in zip(hw(x), fixed(x)):
        torch.testing.assert_close(a, b)


def test_frozen_highway_merges_are_the_backbone_reductions_and_cost_nothing():
    plain = build_backbone("swin_nano_patch4_window7", "e3va")
    assert plain.highway.merges is None
    assert not any(".reduction." in n for n, _ in plain.highway.named_parameters())
    trained = build_backbone("swin_nano_patch4_window7", "e3va", train_downsample=True)
    for merge, stage in zip(trained.highway.merges[1:], trained.trunk.layers[1:]):
        assert torch.equal(merge.weight, stage.downsample.reduction.weight) and merge.weight.requires_grad
    # zero in, zero out: the merge keeps the highway's zero start
    x = torch.randn(1, 3, 64, 64)
    fixed = build_backbone("swin_nano_patch4_window7", "fixed").eval()
    fixed.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("highway.")})
    for a, b in zip(trained.eval()(x), fixed(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["e3va", "mona_hw", "mona", "lora"])
def test_methods_apply_to_a_users_own_timm_model(method):
    # Average pooling: the logits read every patch token. Read from the class token alone, they would not depend
    # on what Mona's filters do to patch tokens in the last block (nor, for mona_hw, in any block: the highway
    # never mixes tokens), so those parameters would rightly get no gradient.
    model = timm.create_model("vit_small_patch16_224", embed_dim=64, depth=2, num_heads=2, reg_tokens=4,
                              num_classes=5, img_size=64, global_pool="avg")
    apply_method(model, method)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values()), [n for n, p in trainable.items() if p.grad is None]
    assert model.pos_embed.grad is None
    # Zero-initialised factors (LoRA's B, the highway's last factors) block the gradient of those before them at
    # step 0 only: after one SGD step every trainable tensor gets a non-zero gradient.
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    model.zero_grad()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in trainable.items() if not p.grad.abs().sum() > 0] == []


def test_the_highway_taps_follow_a_users_timm_swin_arithmetic():
    """Told to keep timm's arithmetic on a user's own timm Swin, the highway's frozen pass computes it too: at the
    zero start E3VA's features are the plain model's, at a size where timm and official differ."""
    torch.manual_seed(0)
    kw = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), strict_img_size=False)
    plain = timm.create_model("swin_tiny_patch4_window7_224", **kw).eval()
    model = timm.create_model("swin_tiny_patch4_window7_224", **kw).eval()
    model.load_state_dict(plain.state_dict())
    apply_method(model, "e3va", swin_arithmetic="timm")
    x = torch.randn(1, 3, 200, 232)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), plain.forward_features(x))
