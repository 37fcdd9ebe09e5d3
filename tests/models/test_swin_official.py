"""Swin computes the official arithmetic (tests/models/swin_reference.py) for mona, full and e3va, at any input size;
`swin_arithmetic="timm"` still computes what timm computes. fp32, max abs diff <= 1e-5 on every stage."""

from types import SimpleNamespace

import pytest
import timm
import torch

import swin_reference as ref
from checkpoints import microsoft_release, official_mona_checkpoint
from mona_dist.adapters import apply_method, set_swin_arithmetic
from mona_dist.models import Backbone, build_backbone

TOL = 1e-5
# Swin-T and Swin-L widths, heads and window, 2 blocks per stage (an even and an odd, shifted one) to keep CPU time
# small; the full depths run the same block code.
ARCHS = {
    "swin_t": ("swin_tiny_patch4_window7_224", {"embed_dim": 96, "num_heads": (3, 6, 12, 24)}),
    "swin_l": ("swin_large_patch4_window7_224", {"embed_dim": 192, "num_heads": (6, 12, 24, 48)}),
}
SIZES = [(224, 224), (200, 232), (512, 512), (800, 1344), (201, 230)]
# Multi-second on one CPU thread (Swin-L at 800 x 1344: ~40 s): marked slow, so `make test` runs them and
# `make test-fast` does not.
CASES = [
    pytest.param(arch, size, id=f"{arch}-{size[0]}x{size[1]}",
                 marks=[pytest.mark.slow] if size == (800, 1344) or (arch, size) == ("swin_l", (512, 512)) else [])
    for arch in ARCHS
    for size in SIZES
]


def randomise(bb: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights away from their init, so that every term (relative bias, norms, Mona's gammas, the highway's
    zero-started factors) changes the result."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            scale = 0.5 if "relative_position_bias_table" in name else 0.1 if p.dim() == 1 else 0.02
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return bb.eval()


def build(arch: str, method: str, swin_arithmetic: str = "official", depths=(2, 2, 2, 2)) -> Backbone:
    """What build_backbone does, with fewer blocks: a timm trunk into a Backbone, then the method."""
    timm_name, kw = ARCHS[arch]
    trunk = timm.create_model(timm_name, strict_img_size=False, depths=depths, **kw)
    bb = Backbone(arch, trunk, swin_arithmetic=swin_arithmetic)
    return randomise(apply_method(bb, method))


def max_diffs(ours, theirs) -> list[float]:
    assert [o.shape for o in ours] == [t.shape for t in theirs]
    return [(o - t).abs().max().item() for o, t in zip(ours, theirs)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    out = {(a, m): build(a, m) for a in ARCHS for m in ("full", "mona", "e3va")}
    for a in ARCHS:  # e3va's frozen backbone is full's: one reference pass gives both (CPU time)
        e3va, full = out[a, "e3va"], out[a, "full"]
        assert not e3va.load_state_dict(full.state_dict(), strict=False).unexpected_keys
    return out


@pytest.mark.parametrize("arch,size", CASES)
def test_every_stage_equals_the_official_reference(models, arch, size):
    heads = ARCHS[arch][1]["num_heads"]
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    expected = ref.features(models[arch, "e3va"], x, heads, "e3va") | ref.features(models[arch, "mona"], x, heads, "mona")
    for method in ("full", "mona", "e3va"):
        with torch.no_grad():
            ours = models[arch, method](x)
        diffs = max_diffs(ours, expected[method])
        assert max(diffs) <= TOL, (method, diffs)
        assert tuple(ours[0].shape[-2:]) == (-(-size[0] // 4), -(-size[1] // 4))


def test_the_reference_tells_the_arithmetics_apart(models):
    """timm's arithmetic on the same weights is far from the reference where the official paper says it is:
    only stage 4 at 224 x 224 (its shift), every stage at 200 x 232 (pad then roll)."""
    heads = ARCHS["swin_t"][1]["num_heads"]
    official = models["swin_t", "full"]
    timm_bb = Backbone("swin_t", timm.create_model(ARCHS["swin_t"][0], strict_img_size=False, depths=(2, 2, 2, 2),
                                                   **ARCHS["swin_t"][1]), swin_arithmetic="timm")
    apply_method(timm_bb, "full")
    timm_bb.load_state_dict(official.state_dict())
    timm_bb.eval()
    for size, differs in (((224, 224), [False, False, False, True]), ((200, 232), [True] * 4)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            diffs = max_diffs(timm_bb(x), ref.features(official, x, heads, "full")["full"])
        assert [d > 1e-2 for d in diffs] == differs, (size, diffs)


@pytest.mark.parametrize("method", ["full", "mona", "e3va"])
def test_build_backbone_gives_the_official_arithmetic_by_default(method):
    """The registered Swin-T, whole depth (2, 2, 6, 2), through build_backbone."""
    torch.manual_seed(0)
    bb = randomise(build_backbone("swin_tiny_patch4_window7_224", method))
    x = torch.randn(1, 3, 201, 230)
    with torch.no_grad():
        diffs = max_diffs(bb(x), ref.features(bb, x, (3, 6, 12, 24), method)[method])
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("size", [(224, 224), (200, 232)])
def test_timm_arithmetic_is_timms_own_model(size):
    torch.manual_seed(0)
    trunk = timm.create_model(ARCHS["swin_t"][0], strict_img_size=False, depths=(2, 2, 2, 2), **ARCHS["swin_t"][1])
    with torch.no_grad():
        trunk.norm.weight.uniform_(0.5, 1.5)  # a pretrained final norm: under "timm" it feeds the last output
    own = randomise(trunk)
    bb = Backbone("swin_t", timm.create_model(ARCHS["swin_t"][0], strict_img_size=False, depths=(2, 2, 2, 2),
                                              **ARCHS["swin_t"][1]), swin_arithmetic="timm")
    bb.trunk.load_state_dict({k: v for k, v in own.state_dict().items() if not k.startswith(("norm.", "head."))})
    bb.out_norms[-1].load_state_dict(own.norm.state_dict())
    apply_method(bb, "full")
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ours = bb.eval()(x)
        stages = own.forward_intermediates(x, norm=False, intermediates_only=True)  # NCHW, before any norm
        last = own.forward_features(x).permute(0, 3, 1, 2)  # timm's final norm on the last stage
    theirs = [torch.nn.functional.layer_norm(s.permute(0, 2, 3, 1), s.shape[1:2]).permute(0, 3, 1, 2)
              for s in stages[:3]] + [last]
    assert max(max_diffs(ours, theirs)) <= TOL


def _loaded_features(tmp_path, ckpt: dict, method: str, x: torch.Tensor):
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    bb = build_backbone("swin_tiny_patch4_window7_224", method, pretrained=str(path)).eval()
    with torch.no_grad():
        return bb(x)


def test_an_official_mona_checkpoint_gives_the_reference_features(tmp_path):
    torch.manual_seed(0)
    src = randomise(build_backbone("swin_tiny_patch4_window7_224", "mona"))
    x = torch.randn(1, 3, 200, 232)
    ours = _loaded_features(tmp_path, official_mona_checkpoint(src), "mona", x)
    assert max(max_diffs(ours, ref.features(src, x, (3, 6, 12, 24), "mona")["mona"])) <= TOL


def test_a_microsoft_release_gives_the_reference_features_with_output_norms_at_init(tmp_path):
    torch.manual_seed(0)
    src = randomise(build_backbone("swin_tiny_patch4_window7_224", "full"))
    final_norm = {k: v.clone() for k, v in src.out_norms[3].state_dict().items()}  # away from init
    src.out_norms.apply(lambda m: m.reset_parameters() if isinstance(m, torch.nn.LayerNorm) else None)
    x = torch.randn(1, 3, 200, 232)
    ours = _loaded_features(tmp_path, microsoft_release(src, final_norm), "full", x)
    assert max(max_diffs(ours, ref.features(src, x, (3, 6, 12, 24), "full")["full"])) <= TOL


def _users_swin():
    torch.manual_seed(0)
    return randomise(timm.create_model(ARCHS["swin_t"][0], strict_img_size=False, depths=(2, 2, 2, 2),
                                       **ARCHS["swin_t"][1]))


def test_apply_method_makes_a_users_own_timm_swin_official_unless_told_timm():
    x = torch.randn(1, 3, 200, 232)
    with torch.no_grad():
        kept = _users_swin()
        before = kept.forward_intermediates(x, norm=False, intermediates_only=True)
        apply_method(kept, "lora", swin_arithmetic="timm")  # B starts at zero: the features stay the backbone's
        assert all(torch.equal(a, b) for a, b in zip(before, kept.forward_intermediates(x, norm=False,
                                                                                         intermediates_only=True)))
        switched = _users_swin()
        apply_method(switched, "lora")
        official = switched.forward_intermediates(x, norm=False, intermediates_only=True)
        by_hand = _users_swin()
        set_swin_arithmetic(by_hand, "official")
        assert all(torch.equal(a, b) for a, b in zip(official, by_hand.forward_intermediates(
            x, norm=False, intermediates_only=True)))


def test_set_swin_arithmetic_makes_a_users_own_timm_swin_official():
    model = _users_swin()
    x = torch.randn(1, 3, 200, 232)
    with torch.no_grad():
        before = model.forward_intermediates(x, norm=False, intermediates_only=True)
        set_swin_arithmetic(model, "official")
        apply_method(model, "lora")  # B starts at zero: the features stay the backbone's
        after = model.forward_intermediates(x, norm=False, intermediates_only=True)
    stand_in = SimpleNamespace(trunk=model, out_norms=[torch.nn.LayerNorm(c) for c in (96, 192, 384, 768)])
    expected = ref.features(stand_in, x, ARCHS["swin_t"][1]["num_heads"], "full")["full"]
    norm = [torch.nn.functional.layer_norm(f.permute(0, 2, 3, 1), f.shape[1:2]).permute(0, 3, 1, 2) for f in after]
    assert max(max_diffs(norm, expected)) <= TOL
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(before, after))  # it was timm's before


def test_the_inf_shift_mask_gives_the_official_minus_100_bit_for_bit(models):
    """Our shifted blocks mask with -inf (no denormal probabilities, fast on CPU); the official value is -100."""
    blk = models["swin_l", "full"].trunk.layers[3].blocks[1]
    official = blk.get_attn_mask(torch.zeros(1, 21, 21, 1))  # timm's builder on a padded 21 x 21 map: -100
    assert set(official.unique().tolist()) == {-100.0, 0.0}
    results = []
    for mask in (official, official.masked_fill(official != 0, float("-inf"))):
        x = torch.randn(9, 49, blk.dim, generator=torch.Generator().manual_seed(0), requires_grad=True)
        blk.zero_grad()
        out = blk.attn(x, mask=mask)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append([out, x.grad, blk.attn.qkv.weight.grad, blk.attn.relative_position_bias_table.grad])
    assert all(torch.equal(a, b) for a, b in zip(*results))
