"""One run, one output_dir: the lock a run holds for its whole life, and the start-up checks of its directory.

Rank 0 creates `<output_dir>/run.lock` with O_EXCL (atomic on local file systems and on NFSv3+), holding who it
is: host, boot id, pid and the pid's start time, SLURM job id and restart count. A second run into the same
directory fails at once with one line naming the holder. A lock is stale, and taken over, when
- its holder ran on this host (same boot) and that pid is gone or is another process now (pid reuse: the start
  time differs);
- it was left by an earlier incarnation of this SLURM job (same job id, lower restart count: SLURM requeues a job
  only after all of its processes ended);
- otherwise (another host, where the pid cannot be asked) its heartbeat stopped: the holder touches the lock every
  `HEARTBEAT_S` seconds, and one not touched for `STALE_AFTER_S` is stale. Ages are measured against the file
  server's clock (the mtime of a file we touch ourselves), so clock skew between hosts does not matter.
Other ranks never touch the lock; they learn rank 0's verdict through one broadcast.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

LOCK = "run.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


def _start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (/proc/<pid>/stat field 22); None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def identity() -> dict[str, Any]:
    env = os.environ
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "start_ticks": _start_ticks(os.getpid()), "slurm_job": env.get("SLURM_JOB_ID"),
            "slurm_restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0), "since": time.time()}


def _fs_now(directory: Path) -> float:
    """The file server's clock: the mtime of a file we just wrote there."""
    probe = directory / f".{LOCK}.clock-{os.getpid()}"
    probe.write_bytes(b"")
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def stale_reason(holder: dict[str, Any], heartbeat_age: float, me: dict[str, Any] | None = None) -> str | None:
    """Why the lock of `holder` no longer holds (None: it still does); see the module docstring."""
    me = me or identity()
    if holder.get("host") == me["host"] and holder.get("boot_id") == me["boot_id"]:
        ticks = _start_ticks(int(holder.get("pid", -1)))
        if ticks is None:
            return f"pid {holder.get('pid')} is gone"
        if holder.get("start_ticks") is not None and ticks != holder["start_ticks"]:
            return f"pid {holder.get('pid')} is another process now"
        return None
    if me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"] \
            and int(holder.get("slurm_restart", 0)) < me["slurm_restart"]:
        return f"it was left by restart {holder.get('slurm_restart')} of this SLURM job"
    if heartbeat_age > STALE_AFTER_S:
        return f"its heartbeat stopped {heartbeat_age:.0f} s ago"
    return None


def describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {since}"


class RunLock:
    """`acquire()` or raise ValueError (one line); `release()` at the end of the run (idempotent)."""

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK
        self.me = identity()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.note: str | None = None  # a stale lock taken over: said in the run's log

    def acquire(self) -> "RunLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._break_if_stale()
                continue
            except OSError as err:
                raise ValueError(f"output_dir {self.dir} is not writable ({err.strerror})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise ValueError(f"output_dir {self.dir}: could not take {self.path} (another run keeps taking it)")

    def _read(self) -> tuple[dict[str, Any], float] | None:
        try:
            text, mtime = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = {}  # being written right now, or cut by a crash: judged by its age alone
        return (holder if isinstance(holder, dict) else {}), mtime

    def _break_if_stale(self) -> None:
        got = self._read()
        if got is None:
            return  # released meanwhile: try again
        holder, mtime = got
        age = _fs_now(self.dir) - mtime
        why = stale_reason(holder, age, self.me) if holder else ("it is empty" if age > STALE_AFTER_S else None)
        if why is None:
            who = describe(holder) if holder else "a run that is starting"
            raise ValueError(f"output_dir {self.dir} is in use by another run ({who}; heartbeat {age:.0f} s ago): "
                             f"wait for it or stop it, or choose another output_dir (delete {self.path} only if "
                             f"that run is gone)")
        # Rename, then check that what we renamed is the stale lock we judged: a racing run may have replaced it.
        moved = self.path.with_name(f".{LOCK}.stale-{os.getpid()}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        try:
            if json.loads(moved.read_text() or "{}") != holder:
                os.rename(moved, self.path)  # someone else's fresh lock: put it back, then judge it again
                return
        except (json.JSONDecodeError, OSError):
            pass
        moved.unlink(missing_ok=True)
        self.note = f"took over the lock of {describe(holder) if holder else 'an unknown run'}: {why}"

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or flaky file system must not stop training; others may then judge it stale

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
            got = self._read()
            if got is not None and got[0].get("pid") == self.me["pid"] and got[0].get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)


def check_writable(directory: Path, what: str) -> None:
    """Create `directory` if needed and write a probe file there, or raise one line."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{what} {directory} is not writable ({err.strerror or err})") from None


def trim_metrics(path: Path, step: int) -> int:
    """Keep the records of steps up to `step` in metrics.jsonl (atomic rewrite); return how many were dropped.

    A resumed run replays the steps after its checkpoint: their records from the interrupted run go, and so does
    the once-per-run record (`model/...`) at `step`, which the resumed run writes again."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # cut by a kill
            continue
        at = rec.get("step", 0) if isinstance(rec, dict) else 0
        static = isinstance(rec, dict) and any(k.startswith("model/") for k in rec)
        if at < step or (at == step and not static):
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


class RunStart:
    """What `prepare` settled for this run: the lock (rank 0), the checkpoint to resume, lines for the log."""

    def __init__(self, lock: RunLock | None, checkpoint: Path | None, notes: list[str]):
        self.lock, self.checkpoint, self.notes = lock, checkpoint, notes

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _settle(out: Path, resume: str | None) -> tuple[RunLock, Path | None, list[str]]:
    """Rank 0: lock the directory, then decide what to resume; the lock is released again on any error."""
    from mona_dist.train.checkpoint import checkpoint_root, complete_checkpoints, resolve_resume, set_aside_newer

    check_writable(out, "output_dir")
    lock = RunLock(out).acquire()
    try:
        notes = [lock.note] if lock.note else []
        root = checkpoint_root(out)
        ckpt, note = resolve_resume(out, resume)
        notes += [note] if note else []
        have = complete_checkpoints(root)
        if resume is None and have:
            raise ValueError(f"output_dir {out} already holds checkpoints (newest {have[-1].name}) of an earlier "
                             f"run: continue it with --resume auto, or choose another output_dir")
        if ckpt is not None and ckpt.parent.resolve() == root.resolve():
            aside = set_aside_newer(root, int(ckpt.name.removeprefix("step-")))
            if aside is not None:
                notes.append(f"resuming from {ckpt.name}, an older checkpoint of this run: its newer checkpoints "
                             f"moved to {aside}")
        check_writable(root, "checkpoints directory")
        return lock, ckpt, notes
    except BaseException:
        lock.release()
        raise


def prepare(output_dir: str | Path, resume: str | None, rank: int, world_size: int) -> RunStart:
    """Collective. Rank 0 locks output_dir and settles the resume; every rank then checks that it can write
    checkpoints/ (ranks on other hosts write their own files there). Any problem: the same one line on every rank."""
    import torch.distributed as tdist

    out = Path(output_dir)
    grouped = world_size > 1 and tdist.is_available() and tdist.is_initialized()
    verdict: list[Any] = [None]
    lock = None
    if rank == 0:
        try:
            lock, ckpt, notes = _settle(out, resume)
            verdict[0] = ("ok", str(ckpt) if ckpt else None, notes)
        except (ValueError, FileNotFoundError) as err:
            verdict[0] = ("error", type(err).__name__, str(err))
    if grouped:
        tdist.broadcast_object_list(verdict, src=0)
    if verdict[0][0] == "error":
        raise (FileNotFoundError if verdict[0][1] == "FileNotFoundError" else ValueError)(verdict[0][2])
    _, ckpt, notes = verdict[0]
    mine: str | None = None
    if rank != 0:
        try:
            check_writable(out / "checkpoints", f"checkpoints directory (rank {rank} on {socket.gethostname()})")
        except ValueError as err:
            mine = str(err)
    errors = [mine]
    if grouped:
        errors = [None] * world_size
        tdist.all_gather_object(errors, mine)
    first = next((e for e in errors if e), None)
    if first:
        if lock is not None:
            lock.release()
        raise ValueError(first)
    return RunStart(lock, Path(ckpt) if ckpt else None, notes)
