"""The workaround for gloo's abort at interpreter exit (mona_dist.teardown): which groups `finish()` lets go, and how
a process whose gloo workers outlive the run ends."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from multirank import spawn_variants


def run_engines(rank: int, world_size: int, port: int, variants: list[dict], out: str) -> None:
    """Trains each engine two steps on this rank's batch, then `finish()`: how many gloo workers are left?"""
    from fsdp_workers import NormNet, OPTIM
    from toy import init_group, write_result

    from mona_dist.config.schema import EngineConfig
    from mona_dist.distributed import finish
    from mona_dist.engine import build_engine
    from mona_dist.teardown import gloo_workers

    init_group(rank, world_size, port)
    g = torch.Generator().manual_seed(rank)
    data = {"x": torch.randn(8, 8, generator=g), "y": torch.randint(0, 4, (8,), generator=g)}
    for spec in variants:
        engine = build_engine(NormNet(), EngineConfig(**spec), OPTIM, micro_batch_size=8, world_size=world_size)
        for _ in range(2):
            engine.backward(engine(data)["loss"])
            engine.step()
        engine.release()
        del engine
    before = gloo_workers()
    finish()
    write_result(Path(out), rank, {"before": before, "after": gloo_workers()})


@pytest.mark.slow
def test_finish_lets_the_ddp_and_fsdp_groups_go_while_the_interpreter_lives(tmp_path_factory):
    """torch's destroy alone leaves FSDP's group alive (DTensor's caches hold its mesh), and with it 2 gloo workers
    that can abort the exit; `finish()` releases it, so the destroy joins them."""
    r = spawn_variants(tmp_path_factory, run_engines, [{"name": "ddp"}, {"name": "fsdp"}])
    assert r["before"] > 0, "no gloo workers ran: the test saw nothing"
    assert r["after"] == 0


EXIT_SCRIPT = """
import atexit, os, sys, threading, time
import torch, torch.distributed as tdist
from mona_dist.teardown import exit_process, gloo_workers

class Finalized:
    def __del__(self, write=os.write):
        write(1, b"interpreter finalized\\n")

FINALIZED = Finalized()
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()

tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
t = torch.ones(3)
tdist.all_reduce(t)
KEEP = tdist.group.WORLD if sys.argv[1] == "keep" else None  # what an engine that outlives its run does
tdist.destroy_process_group()
print("workers", gloo_workers())
sys.stdout.write("unflushed")
exit_process(3)
"""


@pytest.mark.parametrize("keep", [True, False], ids=["group-held", "group-destroyed"])
def test_exit_process_skips_finalization_only_while_gloo_workers_live(tmp_path, keep):
    script = tmp_path / "exit.py"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    done = subprocess.run([sys.executable, str(script), "keep" if keep else "drop"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    out = done.stdout
    assert "workers 0" not in out if keep else "workers 0" in out
    # what finalization would have done, done by hand: threads joined, atexit run, buffers flushed
    assert "thread done" in out and "atexit ran" in out and "unflushed" in out
    assert ("interpreter finalized" in out) is not keep


def test_the_command_passes_its_exit_status_through_exit_process():
    """`mona-dist` ends through `cli.run`: argparse's usage error keeps its status 2, --help its 0."""
    bad = subprocess.run([sys.executable, "-m", "mona_dist.cli", "no-such-command"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "mona_dist.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "usage" in ok.stdout
