"""Pretrained weights by name (timm tag, timm/<name>, hf-hub:<repo>) come from a Hugging Face cache, offline."""

import json
import os
import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from mona_dist.models import build_backbone
from mona_dist.models.hub import hub_cache_dir, hub_offline, release_file, resolve_pretrained
from mona_dist.models.pretrained import loading_policy

NANO = "swin_nano_patch4_window7"
TAG = "swin_tiny_patch4_window7_224.ms_in1k"  # a real timm tag; its cached file holds a random nano Swin
REV = "0123456789abcdef0123456789abcdef01234567"


def _random_nano() -> dict[str, torch.Tensor]:
    """A timm-format state dict of the nano Swin (what a timm hub repo's model.safetensors holds)."""
    torch.manual_seed(5)
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                              num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _cache_repo(cache, repo: str, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/REV/FILE}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    for name, sd in files.items():
        if name.endswith(".safetensors"):
            save_file(sd, str(snap / name))
        else:
            torch.save(sd, snap / name)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # the cache is $HF_HOME/hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("name", [TAG, f"timm/{TAG}", f"hf-hub:timm/{TAG}", f"hf-hub:timm/{TAG}@{REV}"])
def test_every_name_form_loads_the_cached_file(offline_cache, name):
    sd = _random_nano()
    _cache_repo(offline_cache, f"timm/{TAG}", {"model.safetensors": sd})
    with loading_policy() as reports:
        bb = build_backbone(NANO, "mona", pretrained=name)
    own = bb.trunk.state_dict()
    loaded = [k for k in sd if k in own]
    assert len(loaded) > 40
    for k in loaded:
        assert torch.equal(own[k], sd[k]), k
    (label, report), = reports
    assert label.startswith(f"{name} (") and str(offline_cache) in label  # the report names the name and the file
    assert report.fraction == 1.0 and report.missing == []


def test_a_hub_repo_with_only_a_torch_file_loads(offline_cache):
    sd = _random_nano()
    _cache_repo(offline_cache, "someone/tiny-swin", {"pytorch_model.bin": sd})
    bb = build_backbone(NANO, "lora", pretrained="hf-hub:someone/tiny-swin")
    assert torch.equal(bb.trunk.layers[1].blocks[0].mlp.fc1.weight, sd["layers.1.blocks.0.mlp.fc1.weight"])


def test_a_local_path_that_exists_wins(offline_cache, tmp_path, monkeypatch):
    sd = _random_nano()
    _cache_repo(offline_cache, f"timm/{TAG}", {"model.safetensors": {k: v + 1 for k, v in sd.items()}})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "timm").mkdir()
    torch.save(sd, tmp_path / "timm" / TAG)  # a file named like the repo, relative to the working directory
    assert resolve_pretrained(f"timm/{TAG}").resolve() == tmp_path / "timm" / TAG
    bb = build_backbone(NANO, "mona", pretrained=f"timm/{TAG}")
    assert torch.equal(bb.trunk.patch_embed.proj.weight, sd["patch_embed.proj.weight"])


def test_an_empty_cache_offline_is_one_fast_line_naming_the_cache(offline_cache):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        build_backbone(NANO, "mona", pretrained="swin_large_patch4_window7_224.ms_in22k")
    msg = str(err.value)
    assert "\n" not in msg
    assert "swin_large_patch4_window7_224.ms_in22k" in msg and str(offline_cache) in msg and "HF_HUB_OFFLINE" in msg
    assert time.perf_counter() - start < 30  # no network retries (online they take ~50 s)


def test_names_that_mean_nothing_are_one_line(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"pretrained file not found: pretrained/nope\.pth \(neither"):
        resolve_pretrained("pretrained/nope.pth")
    with pytest.raises(FileNotFoundError, match=r"Invalid pretrained tag \(no_such_tag\)"):
        resolve_pretrained("swin_large_patch4_window7_224.no_such_tag")


def test_the_paper_weights_name_the_original_release():
    assert release_file("swin_large_patch4_window7_224.ms_in22k") == "swin_large_patch4_window7_224_22k.pth"
    assert release_file("timm/swin_base_patch4_window7_224.ms_in22k") == "swin_base_patch4_window7_224_22k.pth"
    assert release_file("pretrained/swin_large_patch4_window7_224_22k.pth") is None


def test_cache_and_offline_variables_follow_huggingface_hub(tmp_path):
    """Read at call time here, at import in huggingface_hub: the two must agree for every setting (fails if
    huggingface_hub changes its precedence)."""
    settings = [
        {"HF_HOME": str(tmp_path / "home")},
        {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "cache")},
        {"XDG_CACHE_HOME": str(tmp_path / "xdg")},
        {"HUGGINGFACE_HUB_CACHE": str(tmp_path / "legacy"), "HF_HUB_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "yes"},
        {"HF_HUB_OFFLINE": "true"},
    ]
    code = "import json, huggingface_hub.constants as c; print(json.dumps([c.HF_HUB_CACHE, c.HF_HUB_OFFLINE]))"
    names = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
             "TRANSFORMERS_OFFLINE")
    base = {k: v for k, v in os.environ.items() if k not in names}
    for env in settings:
        upstream = json.loads(subprocess.run([sys.executable, "-c", code], env={**base, **env}, check=True,
                                             capture_output=True, text=True).stdout)
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update({**base, **env})
            ours = [hub_cache_dir(), hub_offline()]
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert ours == upstream, env
