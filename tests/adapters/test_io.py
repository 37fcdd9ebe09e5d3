"""Adapter-only files: small, safetensors, loadable onto a fresh backbone, refused by the wrong one."""

import os

import pytest
import torch

from mona_dist.adapters import load_adapter, save_adapter
from mona_dist.models import build_backbone


def _trained(method="mona"):
    torch.manual_seed(1)
    bb = build_backbone("swin_nano_patch4_window7", method)
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return bb.eval()


def test_round_trip_onto_a_fresh_backbone(tmp_path):
    src = _trained()
    path = save_adapter(src, tmp_path / "mona.safetensors", method="mona", backbone=src.name)
    dst = build_backbone("swin_nano_patch4_window7", "mona").eval()
    frozen = {k: v for k, v in src.trunk.state_dict().items() if k in src.trunk_keys}
    dst.trunk.load_state_dict(frozen, strict=False)  # the same frozen weights ("pretrained"), not the adapters
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(dst(x)[-1], src(x)[-1])
    meta = load_adapter(dst, path)
    assert meta == {"method": "mona", "backbone": "swin_nano_patch4_window7"}
    for a, b in zip(dst(x), src(x)):
        torch.testing.assert_close(a, b)
    full_size = sum(p.numel() * 4 for p in src.parameters())
    assert os.path.getsize(path) < 0.25 * full_size


def test_wrong_method_and_broken_file_are_clear_errors(tmp_path):
    path = save_adapter(_trained("mona"), tmp_path / "a.safetensors", method="mona")
    with pytest.raises(ValueError, match=r"does not fit this model .*'mona'"):
        load_adapter(build_backbone("swin_nano_patch4_window7", "lora"), path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_adapter(build_backbone("swin_nano_patch4_window7", "mona"), broken)
    with pytest.raises(FileNotFoundError):
        load_adapter(build_backbone("swin_nano_patch4_window7", "mona"), tmp_path / "nope.safetensors")
