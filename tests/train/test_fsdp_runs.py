"""Real FSDP runs under torchrun on 2 CPU ranks: SIGKILL + resume is bitwise, a 1-rank run resumes a 2-rank
checkpoint (DCP reshards), and a step waits for the device once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ports import free_port
from test_distributed_runs import finish, step_losses, wait_for
from test_host_syncs import extra_reads
from train_helpers import REPO, tiny_config

BIN = Path(sys.executable).parent


def torchrun(config: Path, *args: str, ranks: int = 2) -> subprocess.Popen:
    """`torchrun --nproc_per_node N launch/train.py --config ...` in its own session (so the group can be killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), "launch/train.py", "--config", str(config), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_run(proc: subprocess.Popen, output_dir: Path) -> None:
    """SIGKILL torchrun and its ranks: the ranks run in sessions of their own, so the launcher's group is not all."""
    mine = f"output_dir={output_dir}".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mine in (entry / "cmdline").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
    proc.wait()


def fsdp_config(tmp_path: Path, shards: Path, **train) -> Path:
    return tiny_config(tmp_path, shards, engine={"name": "fsdp", "activation_checkpointing": True},
                       train={"max_steps": 8, "ckpt_interval": 3, "keep_last": 3, "eval_at_end": False, **train})


@pytest.mark.slow
def test_fsdp_sigkill_resume_is_bitwise_and_one_rank_resumes_two(tmp_path, cls_shards):
    full_out, killed_out = tmp_path / "full" / "run", tmp_path / "killed" / "run"
    full_cfg, killed_cfg = fsdp_config(tmp_path / "full", cls_shards), fsdp_config(tmp_path / "killed", cls_shards)
    full = torchrun(full_cfg, "--set", f"output_dir={full_out}")
    killed = torchrun(killed_cfg, "--set", f"output_dir={killed_out}")
    latest = killed_out / "checkpoints" / "latest"
    wait_for(lambda: (latest / "meta.json").is_file(), killed)
    kill_run(killed, killed_out)
    rc, out = finish(full)
    assert rc == 0, out[-3000:]

    resumed_from = int(os.readlink(latest).removeprefix("step-"))
    assert resumed_from < 8 and {p.name for p in latest.iterdir()} >= {"engine", "rank-00000.pt", "rank-00001.pt",
                                                                       "adapter.safetensors", "meta.json"}
    assert (latest / "engine" / ".metadata").is_file()  # DCP's sharded format, one file per rank beside it
    rc, out = finish(torchrun(killed_cfg, "--set", f"output_dir={killed_out}", "--resume", "latest"))
    assert rc == 0, out[-3000:]
    expected = step_losses(full_out)
    assert sorted(expected) == list(range(1, 9))
    assert step_losses(killed_out) == expected  # bitwise: every step, before and after the kill

    # One rank picks up the 2-rank run's step-6 checkpoint and trains on (its data layout changed: a new epoch).
    one_out = tmp_path / "one" / "run"
    rc, out = finish(torchrun(full_cfg, "--set", f"output_dir={one_out}", "--set", "train.max_steps=9",
                              "--resume", str(full_out / "checkpoints" / "step-000006"), ranks=1))
    assert rc == 0, out[-3000:]
    assert "at step 6" in out
    losses = step_losses(one_out)
    assert sorted(losses) == [7, 8, 9] and all(0 < v < 10 for v in losses.values())
    meta = json.loads((one_out / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 9 and meta["engine"] == "fsdp"


def test_an_fsdp_step_waits_for_the_device_once(tmp_path, cls_shards):
    """One process (FSDP on a 1-rank group) with the bf16 policy and activation checkpointing: the engine adds
    no host read per step."""
    config = tiny_config(tmp_path, cls_shards, engine={"name": "fsdp", "precision": "bf16",
                                                       "activation_checkpointing": True})
    syncs, others = extra_reads(config)
    assert syncs == Counter({"agree": 4}), syncs
    assert not others, f"value reads in per-step code outside mona_dist/host_sync.py: {dict(others)}"
