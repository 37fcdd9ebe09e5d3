"""Pre-emption through slurm/common.sh: USR1 reaches the srun'd tasks, exit 75 requeues, the rerun resumes; a
failing task ends the step (srun --kill-on-bad-exit) and is not requeued.

The task stands in for the trainer's signal contract only (USR1 and TERM only set a flag; on the flag save, ignore
both, exit 75; resume when a checkpoint exists); the SLURM side — signal delivery, srun's
termination of a step, `scontrol requeue`, SLURM_RESTART_COUNT, the appended log — is real.
"""

from __future__ import annotations

import re
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TASK = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    d = pathlib.Path(sys.argv[1])
    rank, restart = os.environ["SLURM_PROCID"], os.environ.get("SLURM_RESTART_COUNT", "0")
    ckpt = d / f"checkpoint-rank{rank}"
    if ckpt.exists():
        print(f"rank {rank} restart {restart}: resumed from {ckpt.read_text()}", flush=True)
        sys.exit(0)
    got = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # as the trainer's PreemptionFlag, caught until the process ends
        signal.signal(sig, lambda signo, frame: got.append(signal.Signals(signo).name))
    (d / f"ready-rank{rank}").touch()
    deadline = time.monotonic() + 150  # a guard against a lost signal, not a measurement
    if os.environ.get("FAIL_RANK") == rank:  # fails mid-run: once every rank has its handlers in place
        ready = [d / f"ready-rank{r}" for r in range(int(os.environ["SLURM_NTASKS"]))]
        while not all(p.exists() for p in ready) and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"rank {rank}: fails", flush=True)
        sys.exit(3)
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    if not got:
        print(f"rank {rank}: no signal arrived", flush=True)
        sys.exit(4)
    if os.environ.get("FAIL_RANK"):  # the survivor: a trainer blocked in a collective with the dead rank (NCCL)
        print(f"rank {rank}: got {got[0]}, stays blocked", flush=True)
        time.sleep(150)
        print(f"rank {rank}: was left blocked", flush=True)
        sys.exit(5)
    if rank == os.environ.get("SLOW_RANK"):  # still saving when the other rank has exited 75
        while "SIGTERM" not in got and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"rank {rank} restart {restart}: got {'+'.join(got)} while saving", flush=True)
    ckpt.write_text(f"run {restart}")
    print(f"rank {rank} restart {restart}: got USR1, checkpoint saved", flush=True)
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # as mona_dist.cli.main on its way out with 75
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(75)
""")


def _job(tmp_path, *sbatch_lines: str):
    (tmp_path / "task.py").write_text(TASK)
    script = tmp_path / "job.sh"
    lines = "".join(f"#SBATCH {line}\n" for line in ("--requeue", "--open-mode=append", *sbatch_lines))
    script.write_text(f'#!/bin/bash\n{lines}source "$MONA_DIST_ROOT/slurm/common.sh"\n'
                      f'mona_srun "$PYTHON" {tmp_path}/task.py {tmp_path}\n')
    return script


def _assert_requeued_and_resumed(cluster, job_id: int, rc: int, log: str) -> None:
    assert rc == 0, log
    for rank in (0, 1):
        assert f"rank {rank} restart 0: got USR1, checkpoint saved" in log, log
        assert f"rank {rank} restart 1: resumed from run 0" in log, log
    assert re.search(r"tasks exited 75 .*: requeueing", log), log
    # The first run's lines come before the second's: one output file, appended across the requeue.
    assert log.index("got USR1") < log.index("resumed from")
    fields = cluster.job_fields(job_id)
    assert (fields["JobState"], fields["Restarts"], fields["ExitCode"]) == ("COMPLETED", "1", "0:0")


def _signal_when_ready(cluster, job_env, tmp_path, *scancel_flags: str) -> tuple[int, int, str]:
    """Submit on both nodes, wait until both tasks installed their handler, `scancel --signal=USR1 <flags>`."""
    script, out = _job(tmp_path), tmp_path / "job.out"
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(cluster.sbatch_wait, script, "--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=0",
                          f"--job-name=preempt-{tmp_path.name}", f"--output={out}", env=job_env)
        while not all((tmp_path / f"ready-rank{r}").exists() for r in (0, 1)):
            assert not fut.done(), out.read_text() if out.exists() else "job ended before its tasks were ready"
            time.sleep(0.2)
        cluster.run("scancel", "--signal=USR1", *scancel_flags, f"--name=preempt-{tmp_path.name}")
        job_id, rc = fut.result()
    return job_id, rc, out.read_text()


def test_usr1_to_the_steps_reaches_tasks_not_batch_shell_and_requeues(slurm_cluster, job_env, tmp_path):
    # What `#SBATCH --signal=USR1@120` does at the time limit: signal every step's tasks, not the batch shell.
    job_id, rc, log = _signal_when_ready(slurm_cluster, job_env, tmp_path)
    _assert_requeued_and_resumed(slurm_cluster, job_id, rc, log)
    assert "batch shell got SIGUSR1" not in log


def test_usr1_to_the_batch_shell_is_forwarded_to_tasks(slurm_cluster, job_env, tmp_path):
    # What `--signal=B:USR1@120` does: only the batch shell; common.sh forwards it through srun to the tasks.
    job_id, rc, log = _signal_when_ready(slurm_cluster, job_env, tmp_path, "--batch")
    _assert_requeued_and_resumed(slurm_cluster, job_id, rc, log)
    assert "batch shell got SIGUSR1; forwarding to srun" in log


def test_time_limit_signal_requeues(slurm_cluster, job_env, tmp_path):
    # The production mechanism itself: --signal=USR1@50 with --time=1, sent by slurmctld's own timer (it checks
    # time limits every ~30 s, so this job lasts up to about half a minute).
    script, out = _job(tmp_path, "--time=1", "--signal=USR1@50"), tmp_path / "job.out"
    job_id, rc = slurm_cluster.sbatch_wait(script, "--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=0",
                                           f"--output={out}", env=job_env)
    log = out.read_text()
    _assert_requeued_and_resumed(slurm_cluster, job_id, rc, log)
    assert "batch shell got SIGUSR1" not in log


def test_a_rank_still_saving_when_another_exits_75_is_not_killed_and_the_job_requeues(slurm_cluster, job_env,
                                                                                      tmp_path):
    # srun --kill-on-bad-exit=1 takes the first exit 75 as a bad exit and SIGTERMs rank 1, which is still saving:
    # the signal is caught (the trainer's contract), rank 1 still exits 75, srun returns 75 and the job requeues.
    job_id, rc, log = _signal_when_ready(slurm_cluster, job_env | {"SLOW_RANK": "1"}, tmp_path)
    assert "rank 1 restart 0: got SIGUSR1+SIGTERM while saving" in log, log
    assert "_step_signal: Terminating StepId" in log, log  # srun's own line: it did terminate the step
    _assert_requeued_and_resumed(slurm_cluster, job_id, rc, log)


def test_a_failing_rank_ends_the_step_and_the_job_fails_without_requeue(slurm_cluster, job_env, tmp_path):
    # Rank 1 exits 3; rank 0 stands in for a trainer blocked in a collective with the dead rank (NCCL does not
    # notice): it catches srun's SIGTERM, as the trainer does, and stays blocked, so srun kills it after KillWait.
    # Without --kill-on-bad-exit rank 0 would sit out its 150 s and print "was left blocked".
    script, out = _job(tmp_path), tmp_path / "job.out"
    job_id, rc = slurm_cluster.sbatch_wait(script, "--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=0",
                                           f"--output={out}", env=job_env | {"FAIL_RANK": "1"})
    log = out.read_text()
    assert "rank 1: fails" in log and "rank 0: got SIGTERM, stays blocked" in log, log
    assert "was left blocked" not in log and "requeueing" not in log, log
    assert rc != 0 and "srun exited with status" in log, log
    fields = slurm_cluster.job_fields(job_id)
    assert (fields["JobState"], fields["Restarts"]) == ("FAILED", "0"), fields
