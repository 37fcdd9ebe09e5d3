"""Adapter-only files: small, safetensors, self-describing, loadable onto a fresh backbone, refused by the wrong one."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mona_dist
from mona_dist.adapters import load_adapter, save_adapter
from mona_dist.adapters.io import adapter_metadata, read_adapter_metadata, trainable_state_dict
from mona_dist.models import build_backbone, build_backbone_from_adapter
from mona_dist.tasks import TASKS


def _trained(method="mona", **options):
    torch.manual_seed(1)
    bb = build_backbone("swin_nano_patch4_window7", method, **options)
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
    assert meta == {"format": "mona-dist-adapter/2", "mona_dist": mona_dist.__version__, "method": "mona",
                    "backbone": "swin_nano_patch4_window7", "out_indices": "[0, 1, 2, 3]",
                    "swin_arithmetic": "official", "backbone_prefix": "",
                    "method_options": json.dumps({"dropout": 0.1, "inner_dim": 64, "kernels": [3, 5, 7]})}
    for a, b in zip(dst(x), src(x)):
        torch.testing.assert_close(a, b)
    full_size = sum(p.numel() * 4 for p in src.parameters())
    assert os.path.getsize(path) < 0.25 * full_size


def test_wrong_method_and_broken_file_are_clear_errors(tmp_path):
    path = save_adapter(_trained("mona"), tmp_path / "a.safetensors", method="mona")
    with pytest.raises(ValueError, match=r"does not fit this model .*'mona'"):  # the tensors' check, unchecked
        load_adapter(build_backbone("swin_nano_patch4_window7", "lora"), path, check=False)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_adapter(build_backbone("swin_nano_patch4_window7", "mona"), broken)
    with pytest.raises(FileNotFoundError):
        load_adapter(build_backbone("swin_nano_patch4_window7", "mona"), tmp_path / "nope.safetensors")


@pytest.mark.parametrize("other, said", [
    (dict(method="lora"), "was saved from method mona, this model has method lora"),
    (dict(name="vit_nano_patch16"), "was saved from backbone swin_nano_patch4_window7, this model has backbone "
                                    "vit_nano_patch16"),
    (dict(inner_dim=32), 'was saved from method_options {"dropout": 0.1, "inner_dim": 64, "kernels": [3, 5, 7]}, '
                         'this model has method_options {"dropout": 0.1, "inner_dim": 32, "kernels": [3, 5, 7]}'),
    (dict(out_indices=(1, 3)), "was saved from out_indices [0, 1, 2, 3], this model has out_indices [1, 3]"),
])
def test_a_file_of_another_model_is_one_line_naming_both_values(tmp_path, other, said):
    path = save_adapter(_trained("mona"), tmp_path / "a.safetensors")
    name = other.pop("name", "swin_nano_patch4_window7")
    model = build_backbone(name, other.pop("method", "mona"), **other)
    with pytest.raises(ValueError) as err:
        load_adapter(model, path)
    assert str(err.value) == f"{path} {said}"


def test_how_mona_was_computed_is_neither_recorded_nor_checked(tmp_path):
    src = _trained("mona", recompute=False, fused=False)
    path = save_adapter(src, tmp_path / "a.safetensors")
    assert "recompute" not in read_adapter_metadata(path)["method_options"]
    dst = build_backbone("swin_nano_patch4_window7", "mona").eval()  # recompute and fused by default
    dst.trunk.load_state_dict(src.trunk.state_dict())
    load_adapter(dst, path)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(dst(x), src(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32 rounding only


def test_an_older_file_without_metadata_still_loads(tmp_path):
    src = _trained("lora", rank=4)
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in trainable_state_dict(src).items()}, str(path), metadata={"step": "7"})
    dst = build_backbone("swin_nano_patch4_window7", "lora", rank=4)
    assert load_adapter(dst, path) == {"step": "7"}
    got, want = trainable_state_dict(dst), trainable_state_dict(src)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="does not say which backbone it was saved from"):
        build_backbone_from_adapter(path)


def test_a_backbone_is_built_from_the_file_alone(tmp_path):
    pretrained = tmp_path / "trunk.safetensors"
    base = build_backbone("swin_nano_patch4_window7", "fixed", swin_arithmetic="timm")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(pretrained))
    src = _trained("mona", inner_dim=16, kernels=[3, 5], out_indices=(1, 3), swin_arithmetic="timm")
    src.trunk.load_state_dict({k: v for k, v in base.trunk.state_dict().items()}, strict=False)
    path = save_adapter(src, tmp_path / "a.safetensors", pretrained=str(pretrained))
    bb = build_backbone_from_adapter(path).eval()  # options, outputs, arithmetic and the trunk's weights: the file's
    assert (bb.method, bb.out_indices, bb.swin_arithmetic) == ("mona", (1, 3), "timm")
    # the file's options; how Mona computes (recompute, fused) is not the file's to say: the defaults
    assert bb.method_options == {"inner_dim": 16, "kernels": (3, 5), "dropout": 0.1, "recompute": True, "fused": True}
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(bb(x), src.eval()(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    random_trunk = build_backbone_from_adapter(path, pretrained="").eval()
    assert not torch.equal(random_trunk.trunk.patch_embed.proj.weight, bb.trunk.patch_embed.proj.weight)


def test_a_task_models_file_describes_its_backbone_and_task(tmp_path):
    from mona_dist.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs/cpu/cls.yaml",
                      ["model.method=lora", "model.method_options={rank: 2}", "model.num_classes=5"])
    torch.manual_seed(2)
    model = TASKS.get("cls").build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # as the trainer writes it: the engine's gathered tensors plus the plain model's description
    meta = adapter_metadata(model, task="cls", pretrained=None)
    path = save_adapter(trainable_state_dict(model), tmp_path / "a.safetensors", **meta, step="3")
    saved = read_adapter_metadata(path)
    assert saved["task"] == "cls" and saved["step"] == "3" and "pretrained" not in saved
    assert saved["backbone_prefix"] == "backbone." and saved["out_indices"] == "[3]"
    assert json.loads(saved["method_options"]) == {"rank": 2, "alpha": 1.0}
    bb = build_backbone_from_adapter(path)
    trained = model.backbone.trunk.state_dict()
    for k, v in bb.trunk.state_dict().items():
        if "lora" in k:
            assert torch.equal(v, trained[k]), k
