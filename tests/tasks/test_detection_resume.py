"""SIGKILL after a checkpoint, then `--resume latest`, gives every step's loss of the uninterrupted run, bit for bit:
the Cascade Mask R-CNN task on 2 CPU ranks through the deepspeed launcher (ZeRO-2, activation checkpointing; mmdet's
samplers draw from torch's generator, which the checkpoint restores), and the RetinaNet (voc) task in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def launch(task: str, overrides: list[str], *args: str) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    # coco: 2 ranks under the deepspeed launcher; voc: one plain process
    ranks = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())] if task == "coco" else \
        [sys.executable]
    cmd = [*ranks, "launch/train.py", "--config", str(ROOT / "configs" / "cpu" / f"{task}.yaml"), *args]
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def step_losses(out: Path) -> dict[int, float]:
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("task", ["coco", "voc"])
def test_detector_sigkill_and_resume_gives_the_same_losses(tmp_path, task):
    from mona_dist.data.synthetic import build

    build(task, str(tmp_path / "data"), num_train=24, num_val=4, size=64)
    shards = tmp_path / "data" / "shards"

    def overrides(run: Path) -> list[str]:
        return [f"data.train_shards={shards}/train.index.json", f"data.val_shards={shards}/val.index.json",
                f"output_dir={run}", "train.max_steps=6", "train.ckpt_interval=2", "train.keep_last=3",
                "train.eval_at_end=false", "engine.activation_checkpointing=true", "monitor.progress_bar=false"]

    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    full, killed = launch(task, overrides(full_out)), launch(task, overrides(killed_out))
    latest = killed_out / "checkpoints" / "latest"
    end = time.monotonic() + 600
    while not (latest / "meta.json").is_file():
        assert killed.poll() is None, killed.stdout.read()[-3000:]
        assert time.monotonic() < end, "no checkpoint in time"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    stopped = int(os.readlink(latest).removeprefix("step-"))
    assert stopped < 6
    resumed = launch(task, overrides(killed_out), "--resume", "latest")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert f"at step {stopped}" in out
    expected = step_losses(full_out)
    assert sorted(expected) == list(range(1, 7))
    assert step_losses(killed_out) == expected
