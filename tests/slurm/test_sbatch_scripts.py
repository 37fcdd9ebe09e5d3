"""End to end, the slurm/*.sh scripts unmodified on the local cluster (2 CPU nodes, one rank each):
`<task>_mona.sh` trains and survives a pre-emption by requeue + resume; `bench_e3va.sh` benchmarks on both ranks.
Real everything: cluster, sbatch script, trainer/bench, task, synthetic shards in the real format.

cls and coco: the issue's command, with SET pointing at per-test shards and a short run; coco runs the Cascade Mask
R-CNN of the coco task and reports box and mask AP.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH_FLAGS = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=0")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@dataclass(frozen=True)
class Case:
    script: str          # under slurm/
    config: str          # CPU config the script is pointed at through CONFIG
    data_task: str       # `mona-dist shards synthetic --task ...`
    metric: str          # an eval key that must reach metrics.jsonl
    preempt_steps: int   # long enough that a signal after step 2 lands mid-run
    also: tuple[str, ...] = ()  # more eval keys of the same record (coco: mask AP beside box AP)


CASES = [
    pytest.param(Case("cls_mona.sh", "configs/cpu/cls.yaml", "cls", "eval/top1", 40), id="cls"),
    pytest.param(Case("coco_mona.sh", "configs/cpu/coco.yaml", "coco", "eval/bbox_AP", 30, ("eval/segm_AP",)),
                 id="coco"),
]


def _shards(root: Path, task: str) -> Path:
    """A tiny synthetic data set in the task's real format, converted to shards (`mona-dist shards synthetic`)."""
    out = root / task
    if not (out / "shards" / "val.index.json").exists():
        subprocess.run([sys.executable, "-m", "mona_dist.cli", "shards", "synthetic", "--task", task, "--out",
                        str(out), "--num-train", "32", "--num-val", "8", "--size", "64", "--no-progress"],
                       cwd=REPO, check=True, capture_output=True, text=True)
    return out / "shards"


def _env(case: Case, job_env: dict, tmp_path: Path, run_dir: Path, max_steps: int) -> dict:
    shards = _shards(tmp_path, case.data_task)
    overrides = [f"data.train_shards={shards / 'train.index.json'}", f"data.val_shards={shards / 'val.index.json'}",
                 f"train.max_steps={max_steps}", "train.log_interval=1", "monitor.progress_bar=false"]
    return job_env | {"CONFIG": case.config, "RUN_DIR": str(run_dir), "SET": " ".join(overrides)}


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _check_finished_run(case: Case, run_dir: Path, max_steps: int) -> list[int]:
    """Asserts a complete 2-rank run in run_dir; returns the logged training steps in file order."""
    records = _records(run_dir)
    steps = [r for r in records if "loss" in r]
    assert steps and steps[-1]["step"] == max_steps
    # samples_per_s_rank has one entry per rank of the process group: both ranks joined one group of two.
    assert all(len(r["samples_per_s_rank"]) == 2 for r in steps)
    assert json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())["world_size"] == 2
    evals = [r for r in records if case.metric in r]
    assert evals and evals[-1]["step"] == max_steps and math.isfinite(evals[-1][case.metric])
    assert all(math.isfinite(evals[-1][key]) for key in case.also), evals[-1]
    assert list((run_dir / "tb").rglob("events.out.tfevents.*"))
    return [r["step"] for r in steps]


@pytest.mark.parametrize("case", CASES)
def test_sbatch_script_trains_on_two_nodes(case, slurm_cluster, job_env, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job_id, rc = slurm_cluster.sbatch_wait(REPO / "slurm" / case.script, *SBATCH_FLAGS, f"--output={out}",
                                           env=_env(case, job_env, tmp_path, run_dir, 4), cwd=REPO, timeout=900)
    log = out.read_text()
    assert rc == 0, log
    assert "nodes=node[1-2] ntasks=2 restart=0" in log
    assert _check_finished_run(case, run_dir, 4) == [1, 2, 3, 4]
    if case.data_task != "cls":
        return
    # `mona-dist eval` as one step of 2 tasks on both nodes (srun from the submitting shell): the run's own
    # final eval, exactly, and nothing written into the run
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    res = slurm_cluster.run("srun", *SBATCH_FLAGS, sys.executable, "-m", "mona_dist.cli", "eval", "--config",
                            str(run_dir / "config.yaml"), "--checkpoint", "latest", "--out", str(tmp_path / "eval"),
                            env=job_env, cwd=REPO, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.count('"checkpoint": ') == 1, res.stdout  # one rank 0: both tasks joined one group
    final = [r for r in _records(run_dir) if case.metric in r][-1]
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert got[case.metric] == final[case.metric], (got, final)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


@pytest.mark.parametrize("case", CASES)
def test_sbatch_script_preempted_requeues_and_resumes(case, slurm_cluster, job_env, tmp_path):
    run_dir, out, max_steps = tmp_path / "run", tmp_path / "job.out", case.preempt_steps
    name = f"preempt-{tmp_path.name}"
    env = _env(case, job_env, tmp_path, run_dir, max_steps)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(slurm_cluster.sbatch_wait, REPO / "slurm" / case.script, *SBATCH_FLAGS,
                          f"--job-name={name}", f"--output={out}", env=env, cwd=REPO, timeout=1200)
        while len([r for r in _records(run_dir) if "loss" in r]) < 2:  # mid-run: some steps done, most to go
            assert not fut.done(), out.read_text() if out.exists() else "job ended before training started"
            time.sleep(0.2)
        slurm_cluster.run("scancel", "--signal=USR1", f"--name={name}")  # what --signal=USR1@120 sends
        job_id, rc = fut.result()
    log = out.read_text()
    assert rc == 0, log
    saved = re.search(r"pre-empted: checkpoint \S+ saved at step (\d+); exiting 75", log)
    assert saved and int(saved.group(1)) < max_steps, log
    assert re.search(rf"resumed from \S+ at step {saved.group(1)}\b", log), log
    assert "restart=1" in log and slurm_cluster.job_fields(job_id)["Restarts"] == "1"
    # One metrics file across both runs: every step once, in order, the requeued run continuing where it stopped.
    assert _check_finished_run(case, run_dir, max_steps) == list(range(1, max_steps + 1))


def test_bench_script_runs_on_two_nodes(slurm_cluster, job_env, tmp_path):
    run_dir, out = tmp_path / "bench", tmp_path / "job.out"
    env = job_env | {"RUN_DIR": str(run_dir), "BENCH_ARGS": "--backbone swin_nano_patch4_window7 --methods mona,e3va "
                     "--task cls --img-size 64 --batch-size 2 --steps 2 --warmup 1"}
    job_id, rc = slurm_cluster.sbatch_wait(REPO / "slurm" / "bench_e3va.sh", *SBATCH_FLAGS, f"--output={out}",
                                           env=env, cwd=REPO, timeout=900)
    assert rc == 0, out.read_text()
    assert json.loads((run_dir / "bench_meta.json").read_text())["world_size"] == 2
    rows = json.loads((run_dir / "bench.json").read_text())
    assert [r["method"] for r in rows] == ["mona", "e3va"] and all(r["peak_mem_bytes"] > 0 for r in rows)
