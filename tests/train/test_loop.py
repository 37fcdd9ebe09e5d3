"""The loop in one process (ddp engine, no wrapper): outputs, resume, NaN policies, bad checkpoints, atomic latest."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from train_helpers import tiny_config
from mona_dist.adapters import load_adapter, trainable_state_dict
from mona_dist.config import load_config
from mona_dist.models import build_backbone_from_adapter
from mona_dist.tasks import TASKS
from mona_dist.train import EX_NONFINITE, train
from mona_dist.train import checkpoint as ckpt_mod

EVERY_STEP = {"step", "loss", "lr", "grad_norm", "skipped_steps"}
LOG_STEP = EVERY_STEP | {"samples_per_s", "mem_bytes", "samples_per_s_rank", "data_wait_s", "step_time_s",
                         "skipped_samples"}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    """Last loss logged for each step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def run(path: Path, *overrides: str, resume: str | None = None) -> int:
    return train(load_config(path, list(overrides)), resume=resume)


def test_run_writes_metrics_tensorboard_config_checkpoints_and_adapter(tmp_path, cls_shards):
    path = tiny_config(tmp_path, cls_shards, train={"log_interval": 4})
    assert run(path) == 0
    out = tmp_path / "run"
    recs = records(out)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(EVERY_STEP <= r.keys() and r["grad_norm"] > 0 for r in steps)
    # log steps (the first, every log_interval-th, the last) carry the interval's throughput and peak memory
    logged = [r for r in steps if LOG_STEP <= r.keys()]
    assert [r["step"] for r in logged] == [1, 4, 6]
    assert all(r["mem_bytes"] > 0 and r["samples_per_s"] > 0 and r["step_time_s"] > 0 for r in logged)
    assert steps[0]["lr"] < steps[-1]["lr"] or steps[0]["lr"] != steps[-1]["lr"]  # the schedule moves
    # and as configured (cls.yaml: lr 2e-3, cosine over 6 steps, warm-up 5 from ratio 1e-3), step s running with
    # the lr of k = s - 1 completed steps (mmcv's runner.iter):
    #   lr(k) = 2e-3 * (1 + cos(pi * k / 6)) / 2 * (1 - (1 - k / 5) * (1 - 1e-3) if k < 5 else 1)
    want = [2e-3 * (1 + math.cos(math.pi * k / 6)) / 2 * (1 - (1 - k / 5) * (1 - 1e-3) if k < 5 else 1.0)
            for k in range(6)]
    assert [r["lr"] for r in steps] == pytest.approx(want, rel=1e-9)
    evals = [r for r in recs if "eval/top1" in r]
    assert len(evals) == 1 and evals[0]["step"] == 6 and evals[0]["eval/samples"] == 16
    assert 0.0 <= evals[0]["eval/top1"] <= evals[0]["eval/top5"] <= 1.0
    static = next(r for r in recs if "model/params_trainable" in r)
    assert 0 < static["model/params_trainable"] < static["model/params_total"]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 6
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000006"]  # keep_last=2
    assert os.readlink(root / "latest") == "step-000006"
    cfg = load_config(path)
    model = TASKS.get("cls").build_model(cfg)
    meta = load_adapter(model, root / "latest" / "adapter.safetensors")
    assert meta["step"] == "6"
    # the trainer's adapter file describes the run: the backbone built from it alone holds the trained tensors
    assert (meta["task"], meta["method"], meta["backbone"]) == ("cls", cfg.model.method, cfg.model.backbone)
    bb = build_backbone_from_adapter(root / "latest" / "adapter.safetensors")
    trained, rebuilt = trainable_state_dict(model.backbone), trainable_state_dict(bb)
    assert rebuilt.keys() == trained.keys() and all(torch.equal(v, trained[k]) for k, v in rebuilt.items())


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, cls_shards):
    # A constant schedule after warm-up, so that stopping at max_steps=4 leaves the lr of steps 5-6 unchanged.
    sched = {"kind": "constant", "warmup_iters": 2}
    full = tiny_config(tmp_path / "a", cls_shards, schedule=sched)
    part = tiny_config(tmp_path / "b", cls_shards, schedule=sched)
    assert run(full) == 0
    assert run(part, "train.max_steps=4") == 0
    assert run(part, resume="latest") == 0  # back to max_steps=6 from step 4
    assert step_losses(tmp_path / "b" / "run") == step_losses(tmp_path / "a" / "run")  # bitwise


def test_nan_loss_stops_after_saving(tmp_path, cls_shards, capsys):
    """An absurd lr makes the second step's loss non-finite for real (weights ~1e30 overflow)."""
    path = tiny_config(tmp_path, cls_shards, optim={"lr": 1e30}, schedule={"warmup_iters": 0})
    assert run(path) == EX_NONFINITE
    root = tmp_path / "run" / "checkpoints"
    assert os.readlink(root / "latest") == "step-000001"
    assert (root / "step-000001" / "meta.json").is_file()
    assert "non-finite loss at step 2; stopped" in capsys.readouterr().err


def test_nan_loss_is_skipped_with_skip_policy(tmp_path, cls_shards):
    path = tiny_config(tmp_path, cls_shards, optim={"lr": 1e30}, schedule={"warmup_iters": 0},
                       train={"nan_policy": "skip", "max_steps": 4, "eval_at_end": False})
    assert run(path) == 0
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["loss"] != "nan" and all(r["loss"] == "nan" for r in steps[1:])
    assert steps[-1]["skipped_steps"] == 3
    root = tmp_path / "run" / "checkpoints"
    a = ckpt_mod.safe_torch_load(root / "step-000002" / "engine.pt")["model"]
    b = ckpt_mod.safe_torch_load(root / "step-000004" / "engine.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # skipped steps leave the weights alone
    assert run(path, "train.max_steps=5", resume="latest") == 0
    assert records(tmp_path / "run")[-1]["skipped_steps"] == 4  # the counter survives a resume


def test_resume_modes(tmp_path, cls_shards):
    path = tiny_config(tmp_path, cls_shards, train={"max_steps": 2, "eval_at_end": False})
    with pytest.raises(FileNotFoundError, match="--resume latest: no complete checkpoint in .*checkpoints"):
        run(path, resume="latest")
    assert run(path, resume="auto") == 0  # nothing there: a fresh run
    assert run(path, "train.max_steps=3", resume="auto") == 0  # now resumes from step 2
    assert [r["step"] for r in records(tmp_path / "run") if "loss" in r] == [1, 2, 3]


def test_resume_refuses_another_engine(tmp_path, cls_shards):
    path = tiny_config(tmp_path, cls_shards, train={"max_steps": 2, "eval_at_end": False})
    assert run(path) == 0
    with pytest.raises(ValueError, match="has engine=.ddp.; this run has .fairscale."):
        run(path, "engine.name=fairscale", "engine.zero_stage=1", "train.max_steps=3", resume="latest")


@pytest.mark.parametrize("target", ["engine.pt", "rank-00000.pt"])
def test_truncated_checkpoint_is_a_one_line_error(tmp_path, cls_shards, target):
    path = tiny_config(tmp_path, cls_shards, train={"max_steps": 2, "eval_at_end": False})
    assert run(path) == 0
    f = tmp_path / "run" / "checkpoints" / "latest" / target
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated or not a torch file") as info:
        run(path, "train.max_steps=3", resume="latest")
    assert "\n" not in str(info.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_checkpoint_cannot_run_code(tmp_path, cls_shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tiny_config(tmp_path, cls_shards, train={"max_steps": 2, "eval_at_end": False})
    assert run(path) == 0
    engine_pt = tmp_path / "run" / "checkpoints" / "latest" / "engine.pt"
    torch.save({"model": _Exploit(), "optimizer": {}}, engine_pt)
    with pytest.raises(ValueError, match="not plain tensors/containers"):
        run(path, "train.max_steps=3", resume="latest")
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_foreign_directory_is_rejected(tmp_path, cls_shards):
    path = tiny_config(tmp_path, cls_shards)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint directory \\(no meta.json"):
        run(path, resume=str(tmp_path / "elsewhere"))


def test_kill_during_save_never_breaks_latest(tmp_path, cls_shards, monkeypatch):
    """Die at the worst instant (step dir written, not yet renamed): `latest` still names a complete checkpoint,
    a resume works from it, and the next save clears the leftover."""
    path = tiny_config(tmp_path, cls_shards, train={"max_steps": 4, "eval_at_end": False})
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(src).endswith(".step-000004.partial"):
            raise KeyboardInterrupt("killed mid-save")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run(path)
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    root = tmp_path / "run" / "checkpoints"
    assert os.readlink(root / "latest") == "step-000002" and (root / "latest" / "meta.json").is_file()
    assert (root / ".step-000004.partial").is_dir()
    assert run(path, resume="latest") == 0
    assert os.readlink(root / "latest") == "step-000004" and not (root / ".step-000004.partial").exists()


def test_missing_data_set_names_the_command_that_makes_it(tmp_path, cls_shards, capsys, monkeypatch):
    """The shipped configs read data/synthetic/cls/...; a checkout without it is told how to make it."""
    from mona_dist.cli import main

    monkeypatch.chdir(tmp_path)
    path = tiny_config(tmp_path, cls_shards, data={"train_shards": "data/synthetic/cls/shards/train.index.json"})
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mona-dist shards synthetic --task cls" in err[0], err


@pytest.mark.slow
def test_zero3_with_parameter_and_optimizer_offload_matches_ddp(tmp_path, cls_shards):
    """One process, DeepSpeed ZeRO-3 offloading parameters and optimizer to CPU: DDP's losses, adapter saved whole."""
    base = {"train": {"max_steps": 3, "eval_at_end": False, "ckpt_interval": 3}}
    assert run(tiny_config(tmp_path / "ddp", cls_shards, **base)) == 0
    z3 = tiny_config(tmp_path / "z3", cls_shards, **base, engine={"name": "deepspeed", "zero_stage": 3,
                                                                  "offload_optimizer": True, "offload_params": True})
    assert run(z3) == 0
    ddp, zero3 = step_losses(tmp_path / "ddp" / "run"), step_losses(tmp_path / "z3" / "run")
    assert list(zero3.values()) == pytest.approx(list(ddp.values()), rel=1e-4)
    model = TASKS.get("cls").build_model(load_config(z3))
    initial = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    load_adapter(model, tmp_path / "z3" / "run" / "checkpoints" / "latest" / "adapter.safetensors")  # every tensor
    # whole: every trainable tensor, at its full shape, holding the trained values (DDP's after the same 3 steps;
    # DeepSpeed's CPU Adam rounds apart from torch's AdamW), not the model's initial ones
    from safetensors.torch import load_file

    want = load_file(str(tmp_path / "ddp" / "run" / "checkpoints" / "latest" / "adapter.safetensors"))
    got = trainable_state_dict(model)
    assert got.keys() == want.keys() == initial.keys()
    for k, t in got.items():
        torch.testing.assert_close(t, want[k], rtol=1e-4, atol=1e-6, msg=k)
    assert sum(not torch.equal(t, initial[k]) for k, t in got.items()) > len(got) // 2  # the steps moved them
