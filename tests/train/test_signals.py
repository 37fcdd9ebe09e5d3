"""Cluster signals reach a job's whole process group: the run checkpoints at its next step boundary and every rank
exits 75, while its DataLoader workers ignore the signal (torch's worker handler used to kill them first)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_distributed_runs import finish, launch, step_losses, wait_for
from test_fsdp_runs import torchrun
from train_helpers import REPO, tiny_config


def long_run(tmp_path: Path, shards: Path, **engine) -> Path:
    return tiny_config(tmp_path, shards, data={"workers": 2}, engine=engine or {"name": "ddp", "zero_stage": 0},
                       train={"max_steps": 400, "ckpt_interval": 0, "log_interval": 1, "eval_at_end": False})


def group_gone(pgid: int, timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def stopped_at(out_dir: Path) -> int:
    latest = out_dir / "checkpoints" / "latest"
    assert (latest / "meta.json").is_file(), "no checkpoint was saved"
    return int(os.readlink(latest).removeprefix("step-"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_group_signal_to_a_single_process_run_checkpoints_and_exits_75(tmp_path, cls_shards, sig):
    cfg, out_dir = long_run(tmp_path, cls_shards), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "launch/train.py", "--config", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(lambda: (out_dir / "metrics.jsonl").is_file() and len(step_losses(out_dir)) >= 2, proc)
    os.killpg(proc.pid, sig)  # what SLURM, torchrun and the deepspeed launcher do: trainer and workers alike
    rc, out = finish(proc, timeout=120)
    assert rc == 75, out[-3000:]
    assert "pre-empted: checkpoint" in out and "killed by signal" not in out
    at = stopped_at(out_dir)
    assert 2 <= at < 400 and max(step_losses(out_dir)) == at
    assert group_gone(proc.pid)  # the workers ended with their trainer


# `mona-dist train` as launch/train.py runs it (cli.run: main, then teardown.exit_process), with one SIGTERM sent
# to itself between the two: after main has returned, so certainly after the checkpoint, whatever the timing.
LATE_SIGTERM_DRIVER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from mona_dist.cli import main
from mona_dist.teardown import exit_process
code = main(["train", *sys.argv[1:]])
os.kill(os.getpid(), signal.SIGTERM)
exit_process(code)
"""


@pytest.mark.slow
def test_signals_after_the_preemption_checkpoint_do_not_turn_exit_75_into_a_kill(tmp_path, cls_shards):
    # Under `srun --kill-on-bad-exit=1` (slurm/common.sh) the first rank to exit 75 makes srun SIGTERM the others,
    # which are on their way out too: a SIGTERM after the checkpoint, until the process is gone, must leave it at
    # 75 (SLURM requeues 75, not 143). Without ignore_preemption_signals this dies of the signal on the way out.
    # A SIGTERM every 5 ms from the pre-emption on reaches the checkpoint, the group's leave and teardown as the
    # timing falls; the run's own SIGTERM after main returned is one past the checkpoint on every run.
    cfg, out_dir = long_run(tmp_path, cls_shards), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = tmp_path / "late_sigterm.py"
    driver.write_text(LATE_SIGTERM_DRIVER.format(repo=str(REPO)))
    log = (tmp_path / "train.log").open("w")  # a file, not a pipe: nobody reads while the signals are sent
    proc = subprocess.Popen([sys.executable, str(driver), "--config", str(cfg), "--set", "data.workers=0"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (out_dir / "metrics.jsonl").is_file() and len(step_losses(out_dir)) >= 2, proc)
    proc.send_signal(signal.SIGUSR1)
    while proc.poll() is None:  # one SIGTERM every 5 ms through the checkpoint, the group's leave and teardown
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.005)
    rc, out = proc.wait(timeout=120), (tmp_path / "train.log").read_text()
    assert rc == 75, (rc, out[-3000:])
    assert "pre-empted: checkpoint" in out
    assert 2 <= stopped_at(out_dir) < 400


@pytest.mark.slow
def test_group_sigterm_to_a_two_rank_deepspeed_launcher_run_checkpoints_and_every_rank_exits_75(tmp_path, cls_shards):
    # the ddp engine under the deepspeed launcher: what is tested is how the launcher's process tree takes a group
    # signal (runner dies, launcher SIGTERMs each rank's tree and waits), not DeepSpeed's engine
    cfg, out_dir = long_run(tmp_path, cls_shards), tmp_path / "run"
    proc = launch(cfg, "--set", f"output_dir={out_dir}", "--set", "data.workers=1")
    wait_for(lambda: (out_dir / "metrics.jsonl").is_file() and len(step_losses(out_dir)) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # runner, launcher, both ranks and their workers
    _, out = finish(proc, timeout=120)  # the runner dies of it at once; the pipe closes when the ranks are done
    assert "pre-empted: checkpoint" in out and "rank 1: pre-empted at step" in out, out[-3000:]
    at = stopped_at(out_dir)
    assert {p.name for p in (out_dir / "checkpoints" / "latest").iterdir()} >= {"rank-00000.pt", "rank-00001.pt"}
    assert 2 <= at < 400 and max(step_losses(out_dir)) == at
    assert f"rank 1: pre-empted at step {at}; exiting 75" in out
    assert group_gone(proc.pid)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_a_deepspeed_run_with_a_checkpoint_that_one_rank_resumes(tmp_path, cls_shards):
    # DeepSpeed's engine (ZeRO-2) under torchrun: torchrun starts each rank in a session of its own, so a signal to
    # its group reaches torchrun alone, which forwards SIGTERM to the ranks and waits for them
    cfg, out_dir = long_run(tmp_path, cls_shards, name="deepspeed", zero_stage=2), tmp_path / "run"
    proc = torchrun(cfg, "--set", f"output_dir={out_dir}", "--set", "data.workers=1")
    wait_for(lambda: (out_dir / "metrics.jsonl").is_file() and len(step_losses(out_dir)) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, out = finish(proc, timeout=120)
    assert "pre-empted: checkpoint" in out and "killed by signal" not in out, out[-3000:]
    at = stopped_at(out_dir)
    assert 2 <= at < 400 and max(step_losses(out_dir)) == at
    assert f"rank 1: pre-empted at step {at}; exiting 75" in out
    assert {p.name for p in (out_dir / "checkpoints" / "latest").iterdir()} >= {"engine", "rank-00000.pt",
                                                                               "rank-00001.pt", "meta.json"}

    # The requeued job landed on one rank: it continues from that checkpoint, one metrics record per step.
    resume = ["--set", f"output_dir={out_dir}", "--set", f"train.max_steps={at + 2}", "--set", "data.workers=1",
              "--set", "train.ckpt_interval=100", "--resume", "auto"]
    rc, out = finish(torchrun(cfg, *resume, ranks=1))
    assert rc == 0, out[-3000:]
    assert f"at step {at}" in out
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, at + 3)), steps  # no step twice, none missing
    assert all(0 < r["loss"] < 10 for r in records if "loss" in r)
    meta = json.loads((out_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == at + 2 and meta["engine"] == "deepspeed"
