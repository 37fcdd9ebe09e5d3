"""Pretrained files in timm, Microsoft-Swin and official-Mona formats load; too little loaded is an error."""

import re

import pytest
import timm
import torch

from checkpoints import microsoft_release, official_mona_checkpoint
from mona_dist.cli import main
from mona_dist.models import build_backbone, load_pretrained

NANO = "swin_nano_patch4_window7"


def _source(method="mona"):
    torch.manual_seed(3)
    bb = build_backbone(NANO, method)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return bb.eval()


def _assert_same(a, b):
    x = torch.randn(1, 3, 64, 64)
    for fa, fb in zip(a.eval()(x), b.eval()(x)):
        torch.testing.assert_close(fa, fb)


def test_official_mona_checkpoint_loads_everything(tmp_path):
    src = _source()
    path = tmp_path / "mona_official.pth"
    torch.save(official_mona_checkpoint(src), path)
    _assert_same(build_backbone(NANO, "mona", pretrained=str(path)), src)


def test_microsoft_swin_release_loads_into_any_method(tmp_path):
    src = _source("fixed")
    final_norm = {"weight": torch.rand(256) + 0.5, "bias": torch.randn(256)}
    path = tmp_path / "swin_ms.pth"
    torch.save(microsoft_release(src, final_norm), path)
    bb = build_backbone(NANO, "e3va", pretrained=str(path), train_downsample=True)
    for k, v in src.trunk.state_dict().items():
        assert torch.equal(bb.trunk.state_dict()[k], v), k
    # the highway's trainable merges were copied from the loaded (not the random) patch merging
    assert torch.equal(bb.highway.merges[2].weight, src.trunk.layers[2].downsample.reduction.weight)


def test_the_final_norm_feeds_the_last_output_only_under_timm_arithmetic(tmp_path):
    src = _source("fixed")
    final_norm = {"weight": torch.rand(256) + 0.5, "bias": torch.randn(256)}
    path = tmp_path / "swin_ms.pth"
    torch.save(microsoft_release(src, final_norm), path)
    official = build_backbone(NANO, "mona")
    report = load_pretrained(official, path)
    assert report.unexpected == ["norm.bias", "norm.weight"]  # as in the official runs' logs
    assert torch.equal(official.out_norms[3].weight, torch.ones(256))
    timm_bb = build_backbone(NANO, "mona", swin_arithmetic="timm")
    assert load_pretrained(timm_bb, path).unexpected == []
    assert torch.equal(timm_bb.out_norms[3].weight, final_norm["weight"])


def test_timm_format_with_window_resize(tmp_path):
    timm_model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=32, depths=(2, 2, 2, 2),
                                   num_heads=(1, 2, 4, 8), window_size=8)  # another window: tables resample
    path = tmp_path / "timm.pth"
    torch.save(timm_model.state_dict(), path)
    bb = build_backbone(NANO, "lora", pretrained=str(path))
    assert torch.equal(bb.trunk.layers[1].blocks[0].attn.qkv.weight, timm_model.layers[1].blocks[0].attn.qkv.weight)
    assert bb.trunk.layers[0].blocks[0].attn.relative_position_bias_table.shape == (13 * 13, 1)


def test_a_checkpoint_that_loads_too_little_is_an_error(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_small_patch16_224", depth=2).state_dict(), path)
    with pytest.raises(ValueError, match=r"only \d+/\d+ backbone tensors match swin_nano_patch4_window7"):
        build_backbone(NANO, "mona", pretrained=str(path))


def test_truncated_or_code_carrying_files_are_refused(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_source().state_dict(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        build_backbone(NANO, "mona", pretrained=str(cut))
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": print}, evil)  # a pickled callable
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        build_backbone(NANO, "mona", pretrained=str(evil))


def test_convert_command_turns_an_official_checkpoint_into_ours(tmp_path, capsys):
    src = _source()
    official = tmp_path / "official.pth"
    torch.save(official_mona_checkpoint(src), official)
    ours = tmp_path / "ours.safetensors"
    assert main(["convert", str(official), str(ours), "--backbone", NANO]) == 0
    _assert_same(build_backbone(NANO, "mona", pretrained=str(ours)), src)
    adapter = tmp_path / "adapter.safetensors"
    assert main(["convert", str(official), str(adapter), "--backbone", NANO, "--adapter-only"]) == 0
    assert adapter.stat().st_size < ours.stat().st_size / 3


def test_weights_of_a_deeper_model_fail_unless_pretrained_strict_is_off(tmp_path):
    """Swin-S into Swin-T used to drop 12 blocks silently: here a release with blocks the nano trunk lacks."""
    from mona_dist.models.pretrained import loading_policy

    src = _source("fixed")
    sd = microsoft_release(src, {"weight": torch.rand(256) + 0.5, "bias": torch.randn(256)})
    state = sd["model"] if "model" in sd else sd
    extra = {re.sub(r"layers\.2\.blocks\.1\.", "layers.2.blocks.7.", k): v.clone() for k, v in state.items()
             if "layers.2.blocks.1." in k}
    assert extra
    state.update(extra)
    path = tmp_path / "deeper.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"holds another architecture than .*blocks\.7\..*pretrained_strict: false"):
        build_backbone(NANO, "fixed", pretrained=str(path))
    with loading_policy(strict=False) as reports:
        build_backbone(NANO, "fixed", pretrained=str(path))
    (where, report), = reports
    assert where == str(path) and report.architecture  # (buffers such as relative_position_index are not loaded)
    assert all(".blocks.7." in k for k in report.architecture)
    assert "15 unexpected" in report.details() and "trunk.layers.2.blocks.7." in report.details()  # rank 0 prints it
