"""Workaround: a process that used gloo can abort in the interpreter's own shutdown (issue 19, still seen in CI).

What happens (core dump of an aborting rank; pytorch/pytorch#179291 describes the same): each gloo process group
runs worker threads (`pt_gloo_runloop`). After a collective completes, its worker drops the collective's work
object, and with it the last references to the collective's tensors; when Python has already let go of a tensor,
that takes the GIL. If the interpreter is finalizing by then, the worker's `take_gil` calls `pthread_exit`, the
unwind meets a noexcept frame of `ProcessGroupGloo::runLoop`, and libstdc++ calls std::terminate: SIGABRT,
"terminate called without an active exception" and nothing else, after the job's work is done.

`destroy_process_group()` ends the danger only if it destroys the group: the group's destructor joins its workers
after they drop their work. It does not when something else still holds the group, and on torch 2.14 something
does under most engines (measured with the tests' 2-rank CPU engines, gloo workers alive after a barrier, the
destroy and `gc.collect()`):
- FSDP2: DTensor's sharding caches keep the DeviceMesh, whose `_pg_registry` keeps the group;
- DeepSpeed: `deepspeed.utils.groups` keeps its groups in module globals (DeepSpeed's own destroy releases them;
  torch's does not), and a ZeRO-3 engine is kept alive past `destroy()` by its parameters' hooks;
- ZeRO 0-2 and fairscale: a group stays alive with no Python object holding it.
DDP alone lets it go. So there are two layers: `release_group_references()` drops the references we know of (FSDP
and DDP groups then end with the destroy), and `exit_process()` ends a process whose gloo workers are still alive
without finalizing the interpreter, after doing by hand what finalization would have done for us.

A command that fails mid-run ends here too (`report_failure`, issue 24): multiprocessing's atexit handler sends
SIGTERM to the daemon children and then joins them, and DataLoader workers ignore SIGTERM by design (a group signal
must reach the trainer first: data/loader.py), while the traceback keeps the loader's iterator, and so its own
shutdown, alive: every exception with workers alive hung the process forever. `stop_workers` ends them with SIGKILL
before the interpreter's exit joins them; the user gets one line and the traceback goes to a file.
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import NoReturn

GLOO_WORKER = "pt_gloo_runloop"  # the thread name ProcessGroupGloo gives its workers (Linux shows 15 characters)
TRACEBACK_ENV = "MONA_DIST_TRACEBACK"  # =1: a failing command prints its traceback on stderr too
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")  # gloo, when another rank's process ended
EX_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
_traceback_dir: Path | None = None


def gloo_workers() -> int:
    """How many gloo worker threads this process runs now (0 where /proc/self/task is not available)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    count = 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() == GLOO_WORKER
        except OSError:  # the thread ended while we looked
            pass
    return count


def release_group_references() -> None:
    """After `destroy_process_group()`: drop the references to destroyed groups that libraries keep, so that the
    groups are destroyed and their workers joined now, while the interpreter is alive."""
    groups = sys.modules.get("deepspeed.utils.groups")
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:  # what deepspeed.comm.destroy_process_group does after torch's destroy
        release()
    gc.collect()  # engines in reference cycles, and the groups they hold
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    mesh_type = getattr(mesh_module, "DeviceMesh", None)
    if isinstance(mesh_type, type):
        for obj in gc.get_objects():
            # A mesh cached by DTensor outlives its run; eager code resolves groups by name, only torch.compile's
            # tracing reads this registry, and its groups are destroyed: nothing can use them any more.
            if isinstance(obj, mesh_type) and isinstance(getattr(obj, "_pg_registry", None), dict):
                obj._pg_registry.clear()
    gc.collect()


def exit_process(code: int) -> NoReturn:
    """End this process with exit status `code`.

    Without live gloo workers this is `sys.exit(code)`. With them, the interpreter must not finalize: this joins
    the other non-daemon threads, runs the `atexit` handlers (multiprocessing's, logging's, TensorBoard's ...),
    flushes stdout and stderr, and leaves with `os._exit(code)`. What it skips is only the teardown of modules and
    of the objects still alive, which Python does not promise to finalize anyway.
    """
    workers = gloo_workers()
    if not workers:
        sys.exit(code)
    logging.getLogger(__name__).debug("%d gloo worker threads are still alive: leaving without finalizing "
                                      "the interpreter (see mona_dist.teardown)", workers)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging's shutdown among them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced streams
            pass
    os._exit(code)


def stop_workers() -> int:
    """SIGKILL this process's multiprocessing children (DataLoader workers, writer pools) and reap them; how many.

    Their SIGTERM is ignored (data/loader.py), so multiprocessing's atexit `terminate()` + `join()` would wait
    forever. torch's SIGCHLD handler is put back to the default first: it would raise "DataLoader worker killed by
    signal" in the middle of this path."""
    children = [p for p in multiprocessing.active_children() if p.pid is not None]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        try:
            p.kill()
        except (OSError, ValueError):  # ended meanwhile, or already closed
            pass
    for p in children:
        p.join(timeout=10)
    return len(children)


def keep_tracebacks_in(directory: str | Path | None) -> None:
    """Where `report_failure` writes the traceback of a failing command (a run's output_dir); None: a temp file."""
    global _traceback_dir
    _traceback_dir = Path(directory) if directory is not None else None


def _rank() -> int:
    from mona_dist.distributed import get_state

    try:
        return get_state().rank
    except ValueError:  # rank variables that never made sense: start-up reported them
        return 0


def _save_traceback(command: str, err: BaseException, rank: int) -> str:
    """The traceback into `<dir>/traceback-rank<N>.txt` (appended) or a temp file; the path, or why it could not."""
    text = "".join(traceback.format_exception(err))
    header = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {command} (rank {rank}, pid {os.getpid()})\n"
    places = [_traceback_dir / f"traceback-rank{rank}.txt"] if _traceback_dir is not None else []
    import tempfile

    places.append(Path(tempfile.gettempdir()) / f"mona-dist-{os.getpid()}.traceback.txt")
    problem = "no place"
    for path in places:  # a full output_dir (the failure itself, maybe) falls back to the temp directory
        try:
            with open(path, "a") as f:
                f.write(header + text)
            return str(path)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    return f"not saved ({problem})"


def one_line(err: BaseException) -> str:
    """`Type: message` on one line (the message's first line; a bare type when it has none)."""
    text = str(err).strip().splitlines()
    name = type(err).__name__
    return f"{name}: {text[0]}" if text else name


def report_failure(command: str, err: BaseException) -> int:
    """A command that failed with `err` mid-run: stop the loader workers, save the traceback, print one line on
    stderr; returns the exit status (130 for an interrupt, 1 otherwise). The caller then leaves the process group
    without a barrier and ends the process (`exit_process`)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a second Ctrl-C must not cut
    try:  # this path short (it takes a second)
        return _report(command, err)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _report(command: str, err: BaseException) -> int:
    stop_workers()
    rank = _rank()
    where = [n for n in getattr(err, "__notes__", []) if n.startswith("at step")]
    prefix = f"{command}: " + (f"rank {rank}: " if rank else "")
    if os.environ.get(TRACEBACK_ENV) == "1":
        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, KeyboardInterrupt):
        print(f"{prefix}interrupted {where[0] if where else 'during start-up'}", file=sys.stderr, flush=True)
        return EX_INTERRUPTED
    from mona_dist.disk import DiskFull

    if isinstance(err, DiskFull):  # its own words say it all: "no space left on device: <path> (<N> MiB free)"
        print(f"{prefix}error: {err}" + (f" ({where[0]})" if where else ""), file=sys.stderr, flush=True)
        return 1
    saved = _save_traceback(command, err, rank)
    hint = "" if os.environ.get(TRACEBACK_ENV) == "1" else f"; {TRACEBACK_ENV}=1 prints it"
    gone = next((s for s in PEER_GONE if s in str(err)), None)  # a collective's peer died: its own line says why
    what = f"another rank ended, so this one stops too (gloo: {gone})" if gone else one_line(err)
    print(f"{prefix}error: {what} ({where[0] + '; ' if where else ''}traceback: {saved}{hint})",
          file=sys.stderr, flush=True)
    return 1
