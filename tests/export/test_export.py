"""`mona-dist export`: the complete backbone loads back with equal features; --merge gives a timm model whose
features equal the unmerged backbone's within 1e-5 (Swin at 224 with always_partition, ViT at 64x96)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from torch.nn import functional as F

from mona_dist.adapters import load_adapter
from mona_dist.cli import main
from mona_dist.config import load_config
from mona_dist.export import merged_trunk, write_timm
from mona_dist.models import BACKBONES, build_backbone
from mona_dist.tasks import TASKS
from mona_dist.train.rng import seed_everything

TOL = 1e-5  # fp32: (W + s B A) x against W x + s B (A x), and LayerNorm over the same sums


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _run_backbone(cfg_path, step: int):
    """The run's backbone as the test rebuilds it: the config's model and the checkpoint's adapter file."""
    cfg = load_config(cfg_path)
    seed_everything(cfg.train.seed)
    model = TASKS.get(cfg.task).build_model(cfg)
    load_adapter(model, f"{cfg.output_dir}/checkpoints/step-{step:06d}/adapter.safetensors")
    return model.backbone.eval(), cfg


def _timm_from(path, name: str, **kw) -> torch.nn.Module:
    spec = BACKBONES.get(name)
    return timm.create_model(spec.timm_name, pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(path)), **spec.timm_kwargs, **kw).eval()


def _random_lora(name: str, **kw):
    torch.manual_seed(0)
    bb = build_backbone(name, "lora", rank=4, **kw).eval()
    with torch.no_grad():  # B starts at zero: give it trained-like values so that the merge changes qkv
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return bb


def test_export_latest_loads_back_with_equal_features(lora_run, tmp_path, capsys):
    out = tmp_path / "bb.safetensors"
    assert main(["export", "--config", str(lora_run), "--checkpoint", "latest", "--out", str(out)]) == 0
    assert "complete swin_nano_patch4_window7 backbone (lora)" in capsys.readouterr().out
    ref, cfg = _run_backbone(lora_run, 4)  # latest = the newest complete checkpoint, step 4
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "4" and meta["method"] == "lora" and json.loads(meta["out_indices"]) == [3]
    assert json.loads(meta["method_options"]) == {"alpha": 1.0, "rank": 4}  # defaults filled in, as adapter files
    loaded = build_backbone(cfg.model.backbone, "lora", pretrained=str(out), out_indices=(-1,), rank=4).eval()
    fresh = build_backbone(cfg.model.backbone, "lora", out_indices=(-1,), rank=4).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert _max_diff(loaded(x), ref(x)) == 0.0
        assert _max_diff(fresh(x), ref(x)) > 1e-3  # the trunk and the trained LoRA really came from the file
    assert any(float(p.detach().abs().max()) > 0 for n, p in loaded.named_parameters() if "lora_B" in n)


def test_export_merge_of_a_run_is_a_timm_model_with_the_runs_features(lora_run, tmp_path, capsys):
    out = tmp_path / "timm.safetensors"
    code = main(["export", "--config", str(lora_run), "--checkpoint", str(lora_run.parent / "run"), "--out", str(out),
                 "--merge"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "always_partition=True" in printed and "pretrained_cfg_overlay" in printed
    assert "num_classes=4, pretrained_cfg_overlay=dict(file=" in printed and "num_classes=4)" in printed
    ref, _ = _run_backbone(lora_run, 4)
    model = _timm_from(out, "swin_nano_patch4_window7", always_partition=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _max_diff([model.forward_features(x).permute(0, 3, 1, 2)], ref(x)) < TOL
    # the cls head came along: timm's classifier computes the run's logits (strict load: every key matched)
    cfg = load_config(lora_run)
    seed_everything(cfg.train.seed)
    task_model = TASKS.get(cfg.task).build_model(cfg).eval()
    load_adapter(task_model, f"{cfg.output_dir}/checkpoints/step-000004/adapter.safetensors")
    spec = BACKBONES.get("swin_nano_patch4_window7")
    classifier = timm.create_model(spec.timm_name, pretrained=True, num_classes=4, always_partition=True,
                                   pretrained_cfg_overlay=dict(file=str(out), num_classes=4), **spec.timm_kwargs).eval()
    with torch.no_grad():
        assert _max_diff([classifier(x)], [task_model.logits(x)]) < TOL


def test_checkpoint_of_other_frozen_weights_is_one_line(lora_run, tmp_path, capsys):
    code = main(["export", "--config", str(lora_run), "--set", "train.seed=7",
                 "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "frozen weights built from this config differ from the run's" in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("method", ["mona", "adapter", "e3va"])
def test_methods_that_cannot_merge_say_so_in_one_line(method, lora_run, tmp_path, capsys):
    code = main(["export", "--config", str(lora_run), "--set", f"model.method={method}", "--set",
                 "model.method_options={}", "--out", str(tmp_path / "x.safetensors"), "--merge"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"method {method!r} cannot be merged" in err


def test_no_checkpoint_is_one_line(tmp_path, lora_run, capsys):
    code = main(["export", "--config", str(lora_run), "--set", f"output_dir={tmp_path}", "--out",
                 str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--checkpoint latest: no complete checkpoint" in err


@pytest.mark.parametrize("arithmetic, timm_kw", [("official", {"always_partition": True}), ("timm", {})])
def test_merged_swin_equals_unmerged_at_224(arithmetic, timm_kw, tmp_path):
    """Every stage: timm's intermediates through our output norms (the last one is timm's `norm`)."""
    bb = _random_lora("swin_nano_patch4_window7", swin_arithmetic=arithmetic)
    path, notes = write_timm(bb, tmp_path / "m.safetensors")
    assert notes == []  # the output norms of the earlier stages are at their init
    model = _timm_from(path, "swin_nano_patch4_window7", **timm_kw)
    assert not any(k.endswith("lora_A_q") for k in merged_trunk(bb))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = bb(x)
        stages = model.forward_intermediates(x, intermediates_only=True)
        normed = [F.layer_norm(s.permute(0, 2, 3, 1), (s.shape[1],), n.weight, n.bias, n.eps).permute(0, 3, 1, 2)
                  for s, n in zip(stages, bb.out_norms)]
        assert _max_diff(normed, ours) < TOL
        assert _max_diff([model.forward_features(x).permute(0, 3, 1, 2)], ours[-1:]) < TOL
        # unmerged LoRA really changed the features, so equality above says the merge carried it
        plain = build_backbone("swin_nano_patch4_window7", "fixed", swin_arithmetic=arithmetic).eval()
        plain.load_state_dict({k: v for k, v in bb.state_dict().items() if "lora_" not in k})
        assert _max_diff(plain(x), ours) > 1e-3


def test_official_arithmetic_differs_from_timms_default_at_224(tmp_path):
    """Why the help says always_partition=True: timm drops the shift in the 7x7 last stage, the official code not."""
    bb = _random_lora("swin_nano_patch4_window7")
    path, _ = write_timm(bb, tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _max_diff([_timm_from(path, "swin_nano_patch4_window7").forward_features(x).permute(0, 3, 1, 2)],
                         bb(x)[-1:]) > 1e-2


def test_merged_vit_equals_unmerged(tmp_path):
    """ViT: intermediate outputs compare before timm's norm, through our output norms; loading the merged file into
    our own backbone ('fixed') compares end to end."""
    bb = _random_lora("vit_nano_patch16")
    path, _ = write_timm(bb, tmp_path / "m.safetensors")
    model = _timm_from(path, "vit_nano_patch16")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = bb(x)
        blocks = model.forward_intermediates(x, indices=list(bb.out_indices), intermediates_only=True, norm=False)
        normed = [F.layer_norm(b.permute(0, 2, 3, 1), (b.shape[1],), n.weight, n.bias, n.eps).permute(0, 3, 1, 2)
                  for b, n in zip(blocks, bb.out_norms)]
        assert _max_diff(normed, ours) < TOL
        assert _max_diff(build_backbone("vit_nano_patch16", "fixed", pretrained=str(path)).eval()(x), ours) < TOL


def test_vit_cls_head_is_timms_avg_pool_without_fc_norm(tmp_path):
    from mona_dist.export.merge import timm_head_kwargs

    bb = _random_lora("vit_nano_patch16", out_indices=(-1,))
    head = torch.nn.Linear(64, 3)
    path, _ = write_timm(bb, tmp_path / "m.safetensors", head=head)
    spec = BACKBONES.get("vit_nano_patch16")
    model = timm.create_model(spec.timm_name, pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(
        file=str(path), num_classes=3), **spec.timm_kwargs, **timm_head_kwargs(bb)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        # the last output norm is timm's final norm, eps (1e-6) included, so the head's logits agree to TOL too
        assert _max_diff([model(x)], [head(bb(x)[-1].mean(dim=(2, 3)))]) < TOL


def test_merge_needs_the_whole_trunk():
    bb = build_backbone("swin_nano_patch4_window7", "bitfit", out_indices=(0, 1))
    with pytest.raises(ValueError, match="needs the whole trunk"):
        merged_trunk(bb)
