"""Mona's arithmetic against the paper's formula written out by hand, and its official state-dict names."""

import torch
import torch.nn.functional as F

from mona_dist.adapters import Mona

OFFICIAL_KEYS = {
    "project1.weight", "project1.bias", "project2.weight", "project2.bias", "norm.weight", "norm.bias",
    "gamma", "gammax",
    *(f"adapter_conv.{c}.{w}" for c in ("conv1", "conv2", "conv3", "projector") for w in ("weight", "bias")),
}


def reference(m: Mona, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """REFERENCE.md's Mona, step by step, on (B, N, C) tokens."""
    xn = F.layer_norm(x, (x.shape[-1],), m.norm.weight, m.norm.bias) * m.gamma + x * m.gammax
    p = F.linear(xn, m.project1.weight, m.project1.bias)
    B, N, D = p.shape
    g = p.reshape(B, h, w, D).permute(0, 3, 1, 2)
    convs = [m.adapter_conv.conv1, m.adapter_conv.conv2, m.adapter_conv.conv3]
    y = sum(F.conv2d(g, c.weight, c.bias, padding=c.kernel_size[0] // 2, groups=D) for c in convs) / 3 + g
    z = y + F.conv2d(y, m.adapter_conv.projector.weight, m.adapter_conv.projector.bias)
    z = z.permute(0, 2, 3, 1).reshape(B, N, D)
    return x + F.linear(F.gelu(z), m.project2.weight, m.project2.bias)


def _randomised(c: int) -> Mona:
    torch.manual_seed(0)
    m = Mona(c).eval()  # eval: dropout off
    with torch.no_grad():
        for p in m.parameters():  # away from the init so gamma/norm terms matter
            p.add_(torch.randn_like(p) * 0.1)
    return m


def test_matches_reference_on_tokens_and_grid():
    m, (h, w) = _randomised(12), (5, 7)
    x = torch.randn(2, h * w, 12)
    ref = reference(m, x, h, w)
    torch.testing.assert_close(m(x, hw=(h, w)), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x.reshape(2, h, w, 12)).reshape(2, h * w, 12), ref, rtol=1e-5, atol=1e-5)


def test_init_and_parameter_count():
    for c in (96, 192, 1536):
        m = Mona(c)
        assert sum(p.numel() for p in m.parameters()) == 133 * c + 9728
    m = Mona(32)
    assert torch.all(m.gamma == 1e-6) and torch.all(m.gammax == 1)
    assert m.project2.weight.abs().sum() > 0  # not zero-initialised, as in the official code
    assert torch.all(m.project1.bias == 0) and m.project1.weight.std() < 0.03


def test_official_state_dict_names_load_without_renaming():
    src = _randomised(16)
    assert set(src.state_dict()) == OFFICIAL_KEYS
    dst = Mona(16).eval()
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(1, 9, 16)
    torch.testing.assert_close(dst(x, hw=(3, 3)), src(x, hw=(3, 3)))


def test_prefix_tokens_take_the_linear_path_and_never_reach_the_filters():
    m, (h, w), P = _randomised(8), (3, 4), 2
    x = torch.randn(1, P + h * w, 8)
    out = m(x, hw=(h, w), num_prefix_tokens=P)
    # Patch tokens: exactly Mona on the patch grid alone.
    torch.testing.assert_close(out[:, P:], reference(m, x[:, P:], h, w), rtol=1e-5, atol=1e-5)
    # Prefix tokens: everything but the depthwise filters (y = p).
    xp = x[:, :P]
    p = m.project1(m.norm(xp) * m.gamma + xp * m.gammax)
    z = p + F.linear(p, m.adapter_conv.projector.weight[:, :, 0, 0], m.adapter_conv.projector.bias)
    torch.testing.assert_close(out[:, :P], xp + m.project2(F.gelu(z)), rtol=1e-5, atol=1e-5)
