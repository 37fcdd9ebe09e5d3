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
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
from typing import NoReturn

GLOO_WORKER = "pt_gloo_runloop"  # the thread name ProcessGroupGloo gives its workers (Linux shows 15 characters)


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
