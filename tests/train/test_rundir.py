"""One run, one output_dir: the lock, the fresh-run refusal, config.yaml timing, the resume fallback, metrics
de-duplication and write access checked at start (single process, real loop)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from train_helpers import tiny_config
from mona_dist.config import load_config
from mona_dist.train import train
from mona_dist.train.rundir import LOCK, RunLock, identity


def run(path: Path, *overrides: str, resume: str | None = None) -> int:
    return train(load_config(path, list(overrides)), resume=resume)


def short(tmp_path: Path, shards: Path, **train_keys) -> Path:
    return tiny_config(tmp_path, shards, train={"max_steps": 4, "ckpt_interval": 2, "keep_last": 3,
                                                "eval_at_end": False, "log_interval": 1, **train_keys})


def test_a_second_run_into_a_locked_output_dir_fails_naming_the_holder(tmp_path, cls_shards):
    path = short(tmp_path, cls_shards)
    (tmp_path / "run").mkdir()
    holder = RunLock(tmp_path / "run").acquire()  # a live run: this very process
    try:
        with pytest.raises(ValueError, match=rf"is in use by another run \(pid {os.getpid()} on "
                                             rf"{socket.gethostname()}") as info:
            run(path)
        assert "\n" not in str(info.value)
    finally:
        holder.release()
    assert not (tmp_path / "run" / LOCK).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, cls_shards, capsys):
    path = short(tmp_path, cls_shards)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(json.dumps({**identity(), "pid": dead.pid, "start_ticks": 1}))
    assert run(path) == 0
    assert f"took over the lock of pid {dead.pid}" in capsys.readouterr().out
    assert not (tmp_path / "run" / LOCK).exists()  # released at the end of the run


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused(tmp_path, cls_shards):
    path = short(tmp_path, cls_shards)
    assert run(path) == 0
    with pytest.raises(ValueError, match="already holds checkpoints .*--resume auto, or choose another output_dir"):
        run(path)


def test_config_yaml_is_written_only_once_the_run_is_valid(tmp_path, cls_shards):
    path = short(tmp_path, cls_shards)
    with pytest.raises(FileNotFoundError):  # the data set is missing: found after the directory was settled
        run(path, f"data.train_shards={tmp_path}/nowhere/train.index.json")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_resume_auto_with_a_dangling_latest_uses_the_newest_complete_checkpoint(tmp_path, cls_shards, capsys):
    path = short(tmp_path, cls_shards)
    assert run(path) == 0
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")  # latest -> step-000004 points nowhere
    assert run(path, "train.max_steps=6", resume="auto") == 0
    out = capsys.readouterr().out
    assert "resuming from the newest complete checkpoint step-000002" in out and "at step 2" in out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # replayed steps 3-4 replaced, not duplicated


def test_write_access_is_checked_at_start(tmp_path, cls_shards):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = short(tmp_path, cls_shards)
    with pytest.raises(ValueError, match=r"output_dir .*a-file/run is not writable") as info:
        run(path, f"output_dir={blocker}/run")
    assert "\n" not in str(info.value)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")  # checkpoints/ cannot be created
    with pytest.raises(ValueError, match=r"checkpoints directory .* is not writable"):
        run(path)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step, not at the first save
