"""A failure mid-run ends the run (issue 24): within seconds, loader workers stopped, a non-zero exit and one line on
stderr naming what failed; the traceback goes to <output_dir>/traceback-rank<N>.txt. On two ranks the failing rank
ends the job under the deepspeed launcher and torchrun alike. Before, each of these hung forever: multiprocessing's
atexit handler joined DataLoader workers that ignore SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_distributed_runs import launch, step_losses, wait_for
from test_fsdp_runs import torchrun
from small_disk import mounted_tmpfs
from test_signals import group_gone
from train_helpers import REPO, tiny_config

LIMIT_S = 60  # a failing run must be gone within this of its failure (they hung for good before)
START_S = 360  # start-up and steps before it: DeepSpeed's took 30-170 s on this loaded 2-core machine


@pytest.fixture(scope="module")
def five_classes(cls_shards, tmp_path_factory) -> Path:
    """The cls images plus a fifth class folder, as shards twice: `listed/` with its class list in the index,
    `unlisted/` without one (as a user's own shards may be)."""
    from mona_dist.data import converters
    from mona_dist.data.writer import write_shards

    root = tmp_path_factory.mktemp("five-classes")
    src = root / "train"
    shutil.copytree(cls_shards.parent / "source" / "train", src)
    (src / "zz_extra").mkdir()
    for f in sorted((src / "circle").iterdir())[:8]:
        shutil.copy(f, src / "zz_extra" / f.name)
    refs, classes = converters.imagefolder(str(src))
    assert len(classes) == 5
    for kind, listed in (("listed", classes), ("unlisted", None)):
        write_shards(refs, str(root / kind / "train"), task="cls", classes=listed, per_shard=16, progress=False)
    return root


@pytest.fixture(scope="module")
def bad_label_shards(five_classes) -> Path:
    """Label 4 reaches a 4-class model mid-run, in the cross-entropy of a training step: nothing tells before."""
    return five_classes / "unlisted" / "train.index.json"


def test_shards_with_more_classes_than_the_model_are_refused_at_start_up(tmp_path, cls_shards, five_classes,
                                                                         capsys):
    from mona_dist.cli import main

    index = five_classes / "listed" / "train.index.json"
    cfg = run_config(tmp_path, cls_shards, index)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mona-dist train: error: config: model.num_classes: 4, but the train shards' index ({index}) "
                   f"lists 5 classes"]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything ran


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MiB tmpfs: one checkpoint of the tiny run (6.7 MB) fits, a second does not."""
    with mounted_tmpfs(tmp_path / "disk", "10m") as mnt:
        yield mnt


def run_config(tmp_path: Path, shards: Path, train_shards: Path | None = None, **train) -> Path:
    data = {"workers": 2}
    if train_shards is not None:
        data["train_shards"] = str(train_shards)
    return tiny_config(tmp_path, shards, data=data,
                       train={"max_steps": 400, "ckpt_interval": 0, "log_interval": 1, "eval_at_end": False, **train})


def start(cfg: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MONA_DIST_TRACEBACK", None)
    return subprocess.Popen([sys.executable, "launch/train.py", "--config", str(cfg), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def ended(proc: subprocess.Popen, started: float, limit: float = START_S + LIMIT_S) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a run that must end by itself within `limit` s of `started`."""
    try:
        out, err = proc.communicate(timeout=max(1.0, started + limit - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running {limit} s after its start:\n{(err or out)[-3000:]}") from None
    return proc.returncode, out, err


def our_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("mona-dist train:")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bad-label", "sigint", "disk-full"])
def test_a_failure_mid_run_ends_the_process_with_one_line(kind, tmp_path, cls_shards, bad_label_shards, request):
    if kind == "bad-label":
        cfg = run_config(tmp_path, cls_shards, bad_label_shards)
    elif kind == "sigint":
        cfg = run_config(tmp_path, cls_shards, ckpt_interval=2)
    else:  # the second checkpoint does not fit: step 4's save fills the disk
        disk = request.getfixturevalue("small_disk")
        cfg = run_config(tmp_path, cls_shards, ckpt_interval=2, keep_last=3)
    args = ("--set", f"output_dir={disk / 'run'}") if kind == "disk-full" else ()
    out_dir = disk / "run" if kind == "disk-full" else tmp_path / "run"
    t0 = time.monotonic()
    proc = start(cfg, *args)
    if kind == "sigint":
        wait_for(lambda: (out_dir / "metrics.jsonl").is_file() and len(step_losses(out_dir)) >= 3, proc)
        os.kill(proc.pid, signal.SIGINT)  # the trainer's pid alone, as a Ctrl-C to `python` under a wrapper would
        failed_at = time.time()
    rc, out, err = ended(proc, t0)
    if kind == "bad-label":  # written on the way out
        failed_at = (out_dir / "traceback-rank0.txt").stat().st_mtime
    elif kind == "disk-full":  # the failed save's directory was removed from it
        failed_at = (out_dir / "checkpoints").stat().st_mtime
    assert time.time() - failed_at < LIMIT_S
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert group_gone(proc.pid, timeout=5)  # its loader workers ended with it
    root = out_dir / "checkpoints"
    if kind == "bad-label":
        assert rc == 1
        assert lines[0].startswith("mona-dist train: error: IndexError: Target 4 is out of bounds. (at step ")
        assert "last checkpoint: none" in lines[0] and "MONA_DIST_TRACEBACK=1" in lines[0]
        traceback = (out_dir / "traceback-rank0.txt").read_text()
        assert f"traceback: {out_dir / 'traceback-rank0.txt'}" in lines[0]
        assert "cross_entropy" in traceback and "IndexError: Target 4 is out of bounds." in traceback
    elif kind == "sigint":
        assert rc == 130
        assert lines[0].startswith("mona-dist train: interrupted at step "), lines
        assert f"; last checkpoint: {root}/step-0000" in lines[0]
    else:
        assert rc == 1
        assert lines[0].startswith(f"mona-dist train: error: no space left on device: {root / 'step-000004'} ("), \
            lines
        assert " MiB free) (at step 4; last checkpoint: " in lines[0]
        # the last complete checkpoint stays; the failed save's files are gone (not moved aside: the disk is free)
        assert os.readlink(root / "latest") == "step-000002"
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]
        # and the run resumes from it: nothing is saved before its end this time
        rc, out, err = ended(start(cfg, *args, "--set", "train.max_steps=5", "--set", "train.ckpt_interval=0",
                                   "--resume", "auto"), time.monotonic())
        assert rc == 0, err[-3000:]
        assert f"resumed from {root / 'step-000002'} at step 2" in out
        assert sorted(step_losses(out_dir)) == [1, 2, 3, 4, 5]


def assert_job_ended(rc: int, out: str, out_dir: Path) -> None:
    # the failing rank wrote its traceback on its way out: the whole job was gone soon after
    failed_at = min(p.stat().st_mtime for p in out_dir.glob("traceback-rank*.txt"))
    assert time.time() - failed_at < LIMIT_S
    assert rc != 0
    lines = our_lines(out)
    failed = [line for line in lines if "IndexError: Target 4 is out of bounds." in line]
    assert len(failed) == 1, out[-4000:]
    # the peer stops as soon as the failing rank's process is gone, saying so in one line
    assert len(lines) == 2 and "another rank ended, so this one stops too" in (set(lines) - set(failed)).pop(), lines
    time.sleep(1)
    left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _runs_in(p, out_dir)]
    assert left == [], "processes of the run still alive (ranks or loader workers)"


def _runs_in(proc_dir: Path, out_dir: Path) -> bool:
    try:
        return f"output_dir={out_dir}".encode() in (proc_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


@pytest.mark.slow
def test_a_failing_rank_ends_a_two_rank_deepspeed_launcher_job(tmp_path, cls_shards, bad_label_shards):
    cfg, out_dir = run_config(tmp_path, cls_shards, bad_label_shards), tmp_path / "run"
    t0 = time.monotonic()
    proc = launch(cfg, "--set", f"output_dir={out_dir}", "--set", "engine.name=deepspeed", "--set",
                  "engine.zero_stage=2", "--set", "data.workers=1")
    rc, out, _ = ended(proc, t0)
    assert_job_ended(rc, out, out_dir)
    assert "Traceback" not in out


@pytest.mark.slow
def test_a_failing_rank_ends_a_two_rank_torchrun_job(tmp_path, cls_shards, bad_label_shards):
    cfg, out_dir = run_config(tmp_path, cls_shards, bad_label_shards), tmp_path / "run"
    t0 = time.monotonic()
    proc = torchrun(cfg, "--set", f"output_dir={out_dir}", "--set", "data.workers=1")
    rc, out, _ = ended(proc, t0)
    assert_job_ended(rc, out, out_dir)


def test_an_empty_validation_set_gives_no_metric_not_a_zero(tmp_path, cls_shards, capsys):
    """A val shard holding no sample (a tar with no member; with samples that are all corrupt the loader already
    fails on the padding batches) scored eval/top1=0.0 with eval/samples=0 and exit 0: training now logs no eval
    metric and warns; `mona-dist eval` is an error."""
    import tarfile

    from mona_dist.cli import main

    (tmp_path / "val").mkdir()
    val = tmp_path / "val" / "val-000000.tar"
    tarfile.open(val, "w").close()
    cfg = tiny_config(tmp_path, cls_shards, data={"val_shards": str(val)},
                      train={"max_steps": 1, "ckpt_interval": 1, "eval_at_end": True})
    assert main(["train", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: step 1: the validation set ({val}) yielded no sample to score: no eval metric "
                   f"logged"], err
    assert "eval/" not in (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(["eval", "--config", str(cfg), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mona-dist eval: error: the validation set ({val}) yielded no sample to score"], err


def test_resuming_with_another_model_names_the_field_and_both_values(tmp_path, cls_shards, capsys):
    """It blamed "model.pretrained or train.seed changed?" whatever had changed."""
    from mona_dist.cli import main

    cfg = tiny_config(tmp_path, cls_shards, train={"max_steps": 1, "ckpt_interval": 1, "eval_at_end": False})
    assert main(["train", "--config", str(cfg)]) == 0
    step = tmp_path / "run" / "checkpoints" / "step-000001"
    capsys.readouterr()
    for key, was, now in (("backbone", "swin_nano_patch4_window7", "vit_nano_patch16"), ("method", "mona", "lora")):
        assert main(["train", "--config", str(cfg), "--set", f"model.{key}={now}", "--set", "train.max_steps=2",
                     "--resume", "auto"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"mona-dist train: error: checkpoint {step} was written with model.{key}={was!r}; this run "
                       f"has model.{key}={now!r}"], err
