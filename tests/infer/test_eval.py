"""`mona-dist eval` scores a run's checkpoint exactly as the run's own final evaluation did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mona_dist.cli import main
from infer_helpers import REPO, assert_restores_the_saved_state, final_eval, run_config
from ports import free_port


def eval_metrics(out: Path) -> dict:
    rec = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in rec.items() if k.startswith("eval/")}


def test_cls_eval_equals_the_runs_final_eval(tmp_path, trained):
    config = trained("cls")
    run = config.parent / "run"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["eval", "--config", str(config), "--checkpoint", "latest", "--out", str(tmp_path / "ev")]) == 0
    want = final_eval(run)
    assert set(want) == {"eval/top1", "eval/top5", "eval/samples"}
    assert eval_metrics(tmp_path / "ev") == want  # exact
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "ev" / "tb").iterdir())
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written into the run
    assert_restores_the_saved_state(config)  # the trained weights, not a fresh model's (4 classes: top-5 is 1.0)


def test_seg_eval_equals_the_runs_final_eval_with_the_heads_batchnorm(tmp_path, trained):
    """UperNet's BatchNorm statistics are buffers, not trainable weights: the checkpoint must carry them."""
    config = trained("ade20k")
    ckpt = next((config.parent / "run" / "checkpoints").glob("step-*"))
    assert main(["eval", "--config", str(config), "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev")]) == 0
    want = final_eval(config.parent / "run")
    assert "eval/mIoU" in want and eval_metrics(tmp_path / "ev") == want
    buffers = assert_restores_the_saved_state(config)
    # the statistics are the run's, not a fresh BatchNorm's (mean 0, variance 1)
    means = [t for k, t in buffers.items() if k.endswith(".running_mean")]
    assert means and all(t.abs().sum() > 0 for t in means)


def test_eval_bad_inputs_are_one_line(tmp_path, infer_shards, capsys):
    config = run_config(tmp_path, "cls", infer_shards("cls"))
    assert main(["eval", "--config", str(config), "--checkpoint", "latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mona-dist eval: error: --checkpoint latest: no complete checkpoint") and "\n" not in err
    assert main(["eval", "--config", str(config), "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mona-dist eval: error: --checkpoint {tmp_path / 'nope'}: no such checkpoint directory"
    assert main(["eval", "--config", str(config), "--shards", str(tmp_path / "none.index.json"),
                 "--checkpoint", "latest"]) == 2
    assert "\n" not in capsys.readouterr().err.strip()


@pytest.mark.slow
def test_two_rank_torchrun_eval_of_a_single_process_run(tmp_path, trained):
    """The eval runs on another world size than the run (ddp loads whole states): counts summed over ranks."""
    config = trained("cls")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "mona_dist.cli",
           "eval", "--config", str(config), "--out", str(tmp_path / "ev")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert eval_metrics(tmp_path / "ev") == final_eval(config.parent / "run")


@pytest.mark.parametrize("engine", [{"name": "deepspeed", "zero_stage": 2}, {"name": "fsdp", "zero_stage": 0},
                                    {"name": "fairscale", "zero_stage": 2}], ids=lambda e: e["name"])
def test_every_engines_checkpoint_evaluates_as_the_run_did(tmp_path, infer_shards, engine):
    """Each engine restores its own format (DeepSpeed's shards, FSDP's DCP, fairscale's consolidated state)."""
    from mona_dist.config import load_config
    from mona_dist.distributed import leave
    from mona_dist.train import train

    config = run_config(tmp_path, "cls", infer_shards("cls"), engine=engine, train={"max_steps": 2, "ckpt_interval": 2})
    assert train(load_config(config)) == 0
    leave(wait_for_peers=False)
    assert main(["eval", "--config", str(config), "--out", str(tmp_path / "ev")]) == 0
    assert eval_metrics(tmp_path / "ev") == final_eval(tmp_path / "run")
    # the weights themselves: what the run saved beside its engine state, not a freshly built model's
    from safetensors.torch import load_file

    from mona_dist.infer.restore import restore

    saved = load_file(str(tmp_path / "run" / "checkpoints" / "latest" / "adapter.safetensors"))
    restored = restore(load_config(config), "latest").engine.trainable_weights()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    leave(wait_for_peers=False)
