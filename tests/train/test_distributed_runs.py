"""Real 2-rank runs through the deepspeed launcher on CPU: SIGKILL + resume is bitwise, pre-emption exits 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mona_dist.engine.deepspeed_compat import allreduce_buffer
from ports import free_port
from train_helpers import REPO, tiny_config

BIN = Path(sys.executable).parent


def launch(config: Path, *args: str) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 launch/train.py --config ...` in its own session (so the group can be killed)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "launch/train.py",
           "--config", str(config), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.port = port  # type: ignore[attr-defined]
    return proc


def shm_left(*procs: subprocess.Popen) -> list[str]:
    """DeepSpeed CPU all-reduce buffers these runs left in /dev/shm (engine/deepspeed_compat.py unlinks them)."""
    return [str(allreduce_buffer(rank, "127.0.0.1", p.port)) for p in procs for rank in (0, 1)
            if allreduce_buffer(rank, "127.0.0.1", p.port).exists()]


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def step_losses(out: Path) -> dict[int, float]:
    """Last loss logged per step; lines cut by a kill are ignored."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def rank_pid(output_dir: Path, rank: int) -> int:
    """The pid of one rank of the run writing to `output_dir` (its command line names both)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch/train.py" in cmd and f"--local_rank={rank}".encode() in cmd and \
                f"output_dir={output_dir}".encode() in cmd:
            return int(entry.name)
    raise AssertionError(f"rank {rank} of {output_dir} not found")


def zero2_config(tmp_path: Path, shards: Path, **train) -> Path:
    return tiny_config(tmp_path, shards, engine={"name": "deepspeed", "zero_stage": 2,
                                                 "activation_checkpointing": True},
                       train={"max_steps": 8, "ckpt_interval": 3, "keep_last": 3, "eval_at_end": False, **train})


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run_bitwise(tmp_path, cls_shards):
    full_cfg, killed_cfg = zero2_config(tmp_path / "full", cls_shards), zero2_config(tmp_path / "killed", cls_shards)
    full_out, killed_out = tmp_path / "full" / "run", tmp_path / "killed" / "run"

    full = launch(full_cfg, "--set", f"output_dir={full_out}")
    killed = launch(killed_cfg, "--set", f"output_dir={killed_out}")
    latest = killed_out / "checkpoints" / "latest"
    wait_for(lambda: (latest / "meta.json").is_file(), killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    rc, out = finish(full)
    assert rc == 0, out[-3000:]
    # DeepSpeed never unlinks its CPU all-reduce buffers (66 MB per rank); we do, right after start-up, so neither
    # the finished nor the SIGKILLed run leaves them in RAM-backed /dev/shm
    assert shm_left(full, killed) == []

    # `latest` survived the kill and names a complete checkpoint.
    assert os.readlink(latest).startswith("step-") and (latest / "meta.json").is_file()
    resumed_from = int(os.readlink(latest).removeprefix("step-"))
    assert resumed_from < 8
    rc, out = finish(launch(killed_cfg, "--set", f"output_dir={killed_out}", "--resume", "latest"))
    assert rc == 0, out[-3000:]
    expected = step_losses(full_out)
    assert sorted(expected) == list(range(1, 9))
    assert step_losses(killed_out) == expected  # bitwise: every step, before and after the kill
    assert os.readlink(latest) == "step-000008"


@pytest.mark.slow
def test_preemption_signal_on_one_rank_stops_all_ranks_with_75(tmp_path, cls_shards):
    cfg = zero2_config(tmp_path, cls_shards, max_steps=400, ckpt_interval=0)
    out_dir = tmp_path / "run"
    proc = launch(cfg, "--set", f"output_dir={out_dir}")
    wait_for(lambda: (out_dir / "metrics.jsonl").is_file() and len(step_losses(out_dir)) >= 2, proc)
    os.kill(rank_pid(out_dir, 1), signal.SIGUSR1)  # only rank 1 is told; rank 0 learns it in the all-reduce
    rc, out = finish(proc)
    assert rc == 75, out[-3000:]
    assert "pre-empted: checkpoint" in out
    latest = out_dir / "checkpoints" / "latest"
    stopped_at = int(os.readlink(latest).removeprefix("step-"))
    assert 2 <= stopped_at < 400 and max(step_losses(out_dir)) == stopped_at
    assert {p.name for p in latest.iterdir()} >= {"engine", "rank-00000.pt", "rank-00001.pt", "adapter.safetensors",
                                                  "meta.json"}
    # The requeued job (--resume auto) picks up exactly there.
    rc, out = finish(launch(cfg, "--set", f"output_dir={out_dir}", "--set", f"train.max_steps={stopped_at + 2}",
                            "--resume", "auto"))
    assert rc == 0, out[-3000:]
    assert f"at step {stopped_at}" in out and max(step_losses(out_dir)) == stopped_at + 2


@pytest.mark.slow
def test_zero3_evaluation_with_shares_one_batch_apart_finishes(tmp_path):
    """15 val images on 2 ranks at eval batch 7: shares of 7 and 8 are 1 and 2 batches. Under ZeRO-3 every forward
    all-gathers the weights, so without padding rank 1's second batch waits for rank 0 until the gloo timeout."""
    from mona_dist.data.synthetic import build

    build("cls", str(tmp_path / "data"), num_train=16, num_val=15, size=40, per_shard=8)
    # ZeRO-3 keeps parameters under 1e5 elements whole on every rank; partition all of swin_nano's
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    cfg = tiny_config(tmp_path, tmp_path / "data" / "shards",
                      engine={"name": "deepspeed", "zero_stage": 3, "deepspeed_config": str(ds_json)},
                      data={"eval_batch_size": 7},
                      train={"max_steps": 1, "ckpt_interval": 0, "eval_at_end": True})
    rc, out = finish(launch(cfg), timeout=300)
    assert rc == 0, out[-3000:]
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval/samples" in line]
    assert [e["eval/samples"] for e in evals] == [15.0]  # the padding batch ran but was not scored
