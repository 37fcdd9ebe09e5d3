"""Which GPU a rank drives: its CUDA index, the check that no two ranks of a node share one (before NCCL starts),
and no GPU at all for a CPU DeepSpeed run on a GPU host. `distributed.init_distributed` applies them."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any, Protocol


class Seat(Protocol):
    """Where a rank sits (a `distributed.DistState`; this module imports nothing of mona_dist)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...


def hide_cuda_under_cpu_accelerator(env: MutableMapping[str, str] | None = None) -> bool:
    """With `DS_ACCELERATOR=cpu`, make CUDA invisible to this process; True when it did. Call before CUDA starts.

    The deepspeed launcher sets CUDA_VISIBLE_DEVICES=0..N-1 for its ranks even with the CPU accelerator, so a CPU
    run (the test suite, the demo) on a GPU host would pick NCCL, SyncBN and cuda:N under a CPU DeepSpeed.
    """
    env = os.environ if env is None else env
    if env.get("DS_ACCELERATOR") != "cpu" or env.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    env["CUDA_VISIBLE_DEVICES"] = ""
    return True


def cuda_index(local_rank: int, count: int, local_world_size: int = 1) -> int:
    """The CUDA device of a rank that sees `count` devices.

    One visible device (`srun --gpus-per-task=1`, `--gpu-bind=per_task:1`, a one-GPU job) is cuda:0 whatever the
    local rank; with several, local rank i takes cuda:i (torchrun, the deepspeed launcher, one srun task per node
    seeing all GPUs). A local rank beyond the visible devices is an error, not a silent share.
    """
    if count < 1:
        raise ValueError("no CUDA device is visible to this rank")
    if count == 1:
        return 0
    if local_rank >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(
            f"LOCAL_RANK={local_rank} of {local_world_size} ranks on this node, but this rank sees only {count} CUDA "
            f"devices{f' (CUDA_VISIBLE_DEVICES={visible})' if visible else ''}: bind one GPU per task "
            f"(srun --gpus-per-task=1) or start at most {count} ranks per node")
    return local_rank


def gpu_collisions(devices: list[tuple[str, str]]) -> str | None:
    """`devices[rank] = (host, GPU uuid)`: a one-line description of ranks that would share a GPU, or None."""
    owner: dict[tuple[str, str], int] = {}
    for rank, key in enumerate(devices):
        if key in owner:
            return _shared_gpu(owner[key], rank, *key)
        owner[key] = rank
    return None


def _shared_gpu(first: int, second: int, host: str, uuid: str) -> str:
    return (f"ranks {first} and {second} on {host} both use GPU {uuid}: more ranks per node than GPUs visible to "
            f"them. Bind one GPU per task (srun --gpus-per-task=1) or start one rank per GPU")


def gpu_uuid(device: int) -> str:
    import torch

    return str(getattr(torch.cuda.get_device_properties(device), "uuid", device))


def check_distinct_gpus(state: Seat, store: Any, uuid: str, host: str | None = None) -> None:
    """Refuse, on every rank, a job where two ranks of one node would drive the same GPU.

    NCCL would fail with "Duplicate GPU detected" (or hang). The check runs over the rendezvous store, which every
    rank has already reached, before NCCL starts: no collective, and no new connection between ranks (a gloo group
    opened for it waited for its 30-minute timeout where hostnames resolve to 127.0.1.1 or an unrouted interface).
    Each rank counts itself under its (host, GPU) key; the last rank to arrive says so, and every rank then reads
    whether any key was counted twice (rank 0, which hosts the store, waits until all have read it).
    """
    import socket

    host = host or socket.gethostname()
    key = f"{host}/{uuid}"
    seat = store.add(key, 1)
    store.set(f"{key}/{seat}", str(state.rank))
    if seat > 1:
        first = int(store.get(f"{key}/1"))
        store.set("problem", _shared_gpu(min(first, state.rank), max(first, state.rank), host, uuid))
    if store.add("arrived", 1) == state.world_size:
        store.set("done", "1")
    store.wait(["done"])
    problem = store.get("problem").decode() if store.check(["problem"]) else None
    if store.add("read", 1) == state.world_size:
        store.set("all_read", "1")
    if state.rank == 0:  # rank 0 hosts the store: it leaves only once every rank has read the answer
        store.wait(["all_read"])
    if problem:
        raise ValueError(problem)
