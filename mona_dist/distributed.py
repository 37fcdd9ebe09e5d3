"""Distributed state: the one place in mona-dist that reads rank variables.

Whatever started the process — torchrun, the deepspeed launcher, `srun` under SLURM, or a plain `python` — it ends
up as one frozen `DistState`, and `init_distributed()` turns that into the torch env:// variables plus a process
group. Training code never asks which launcher it was (DINOv2's `dinov2/distributed` does the same).

Precedence, first match wins:
1. `RANK` and `WORLD_SIZE` set: a launcher already did the per-process bookkeeping, so it wins over any SLURM
   variables around it (torchrun or deepspeed started inside an sbatch allocation, one launcher per node).
   `TORCHELASTIC_RUN_ID`/`GROUP_RANK` mark torchrun; `CROSS_RANK`/`LOCAL_SIZE` mark the deepspeed launcher; other
   tools that follow torch's env:// convention are reported as "torchrun".
2. `SLURM_STEP_ID` and `SLURM_PROCID` set: `srun` started one task per rank. The batch shell itself also carries
   `SLURM_PROCID=0` and `SLURM_NTASKS=<all tasks>` but no step id, so a `python` run directly in an sbatch script is
   (correctly) a single process rather than rank 0 of a group that never forms.
3. Otherwise: one process.

Under SLURM the rendezvous host is the first host of the step's node list (where rank 0 runs with srun's block
distribution) and the port is derived from `SLURM_JOB_ID` and `SLURM_RESTART_COUNT`, so concurrent jobs on shared
nodes do not collide and a requeued job does not trip over its previous run's socket. `MASTER_ADDR`/`MASTER_PORT`
in the environment override both.
"""

from __future__ import annotations

import datetime
import os
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mona_dist.gpu_binding import check_distinct_gpus, cuda_index, gpu_uuid, hide_cuda_under_cpu_accelerator

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 29500
# Ports derived for SLURM jobs stay above the usual service range and below Linux's ephemeral range (32768+).
SLURM_PORT_RANGE = (20000, 32000)

T = TypeVar("T")


@dataclass(frozen=True)
class DistState:
    """Where this process sits in the job. `launcher` is "torchrun" | "deepspeed" | "slurm" | "single"."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, metrics and checkpoints' metadata."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1

    def env(self) -> dict[str, str]:
        """The torch env:// variables describing this state (what DeepSpeed and torch read)."""
        return {
            "RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist, as `scontrol show hostnames` would print it first.

    "gpu[07-09,12],cpu3" -> "gpu07", "rack[1-2]-n[01-04]" -> "rack1-n01". Pure (no scontrol call) so that
    `detect` stays side-effect free; tests check it against the real scontrol.
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first host expression
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    expr = nodelist[:end].strip()
    if not expr:
        raise ValueError(f"SLURM node list {nodelist!r} is empty")
    # Each bracket group contributes its first value, written as is (zero padding kept): "[07-09,12]" -> "07".
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1), maxsplit=1)[0].strip(), expr)


def tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's compressed tasks-per-node list: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r} is not a tasks-per-node list like '8(x4)'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_port(job_id: int, restart_count: int = 0) -> int:
    """Rendezvous port for a SLURM job: deterministic on every node, distinct across jobs and requeues."""
    rng = random.Random(f"mona-dist:{job_id}:{restart_count}")  # str seeds hash with sha512: stable everywhere
    return rng.randrange(*SLURM_PORT_RANGE)


def _master(env: Mapping[str, str], addr: str, port: int) -> tuple[str, int]:
    return env.get("MASTER_ADDR") or addr, _int(env, "MASTER_PORT", port)


def _from_launcher(env: Mapping[str, str]) -> DistState:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    deepspeed = "CROSS_RANK" in env or "LOCAL_SIZE" in env
    launcher = "deepspeed" if deepspeed and "TORCHELASTIC_RUN_ID" not in env else "torchrun"
    local_rank = _int(env, "LOCAL_RANK", 0)
    local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world))
    node_default = rank // local_world if local_world > 0 else 0
    node_rank = _int(env, "GROUP_RANK", _int(env, "CROSS_RANK", node_default))
    addr, port = _master(env, DEFAULT_ADDR, DEFAULT_PORT)
    return DistState(rank, local_rank, world, local_world, node_rank, addr, port, launcher)


def _from_slurm(env: Mapping[str, str]) -> DistState:
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    node_rank = _int(env, "SLURM_NODEID", 0)
    if env.get("SLURM_NTASKS_PER_NODE"):  # set when --ntasks-per-node was given: uniform
        local_world = _int(env, "SLURM_NTASKS_PER_NODE")
    else:
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        counts = tasks_per_node(spec)
        local_world = counts[node_rank] if node_rank < len(counts) else counts[0]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist and "MASTER_ADDR" not in env:
        raise ValueError("SLURM_JOB_NODELIST is not set (needed for the rendezvous host)")
    job_id = _int(env, "SLURM_JOB_ID", 0)
    addr, port = _master(env, first_host(nodelist) if nodelist else DEFAULT_ADDR,
                         slurm_port(job_id, _int(env, "SLURM_RESTART_COUNT", 0)))
    return DistState(rank, _int(env, "SLURM_LOCALID", 0), world, local_world, node_rank, addr, port, "slurm")


def _check(state: DistState, names: tuple[str, str, str, str]) -> DistState:
    rank_var, world_var, local_var, local_world_var = names
    if state.world_size < 1:
        raise ValueError(f"{world_var}={state.world_size} must be at least 1")
    if not 0 <= state.rank < state.world_size:
        raise ValueError(f"{rank_var}={state.rank} is not in [0, {world_var}={state.world_size})")
    if state.local_world_size < 1 or state.local_world_size > state.world_size:
        raise ValueError(f"{local_world_var}={state.local_world_size} is not in [1, {world_var}={state.world_size}]")
    if not 0 <= state.local_rank < state.local_world_size:
        raise ValueError(f"{local_var}={state.local_rank} is not in [0, {local_world_var}={state.local_world_size})")
    if not 0 < state.master_port < 65536:
        raise ValueError(f"MASTER_PORT={state.master_port} is not a TCP port")
    return state


def detect(env: Mapping[str, str] | None = None) -> DistState:
    """Read the launcher's variables (os.environ by default) into a DistState. Pure: reads, never writes.

    Raises ValueError naming the variable when a value is not an integer or the values contradict each other.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        if not ("RANK" in env and "WORLD_SIZE" in env):
            missing = "WORLD_SIZE" if "RANK" in env else "RANK"
            raise ValueError(f"{missing} is not set although {'RANK' if missing == 'WORLD_SIZE' else 'WORLD_SIZE'} is")
        state = _from_launcher(env)
        local_world_var = "LOCAL_SIZE" if state.launcher == "deepspeed" else "LOCAL_WORLD_SIZE"
        return _check(state, ("RANK", "WORLD_SIZE", "LOCAL_RANK", local_world_var))
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        local_world_var = next(v for v in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE",
                                           "SLURM_TASKS_PER_NODE", world_var) if env.get(v) or v == world_var)
        return _check(_from_slurm(env), ("SLURM_PROCID", world_var, "SLURM_LOCALID", local_world_var))
    addr, port = _master(env, DEFAULT_ADDR, DEFAULT_PORT)
    return DistState(0, 0, 1, 1, 0, addr, port, "single")


_STATE: DistState | None = None
_PREVIOUS_ENV: dict[str, str | None] = {}  # what init_distributed overwrote, for shutdown() to put back


def process_group_backend(cuda: bool, cpu_collectives: bool = False) -> str:
    """nccl on CUDA, gloo on CPU; "cuda:nccl,cpu:gloo" on CUDA when some collectives run on host tensors.

    NCCL refuses CPU tensors. FSDP2 with CPU offload keeps shards and gradients on the host, so its gradient norm
    and its gathers of the trainable weights run there: such a run reduces CUDA tensors over NCCL and host tensors
    over gloo in one group (as torchtitan does).
    """
    if not cuda:
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"


def init_distributed(backend: str | None = None, timeout_s: int = 1800, cpu_collectives: bool = False) -> DistState:
    """Detect once, export the env:// variables, pick the device and join the process group (idempotent).

    Exports RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT because DeepSpeed and other
    libraries read those and nothing else (not SLURM's). LOCAL_RANK is exported as the CUDA index this rank uses,
    which DeepSpeed passes to `torch.cuda.set_device`: under `srun --gpus-per-task=1` every task sees one GPU,
    cuda:0, whatever its SLURM_LOCALID. Backend: `process_group_backend` (`cpu_collectives`: the run also reduces
    host tensors); under NCCL the group is bound to this rank's GPU (`device_id`).
    """
    global _STATE
    if _STATE is not None:
        return _STATE
    import torch
    import torch.distributed as torch_dist

    hide_cuda_under_cpu_accelerator()
    state = detect()
    device = None
    if torch.cuda.is_available():
        device = cuda_index(state.local_rank, torch.cuda.device_count(), state.local_world_size)
        torch.cuda.set_device(device)
    exported = exports(state, device)
    _PREVIOUS_ENV.update({k: os.environ.get(k) for k in exported})
    os.environ.update(exported)
    if state.distributed and not torch_dist.is_initialized():
        backend = backend or process_group_backend(device is not None, cpu_collectives)
        timeout = datetime.timedelta(seconds=timeout_s)
        # The env:// rendezvous, done here so that the GPU check can use its store before NCCL starts.
        store, _, _ = next(torch_dist.rendezvous("env://", state.rank, state.world_size, timeout=timeout))
        store.set_timeout(timeout)
        if device is not None:
            check_distinct_gpus(state, torch_dist.PrefixStore("mona_dist/gpus", store), gpu_uuid(device))
        torch_dist.init_process_group(
            backend=backend, store=torch_dist.PrefixStore("default_pg", store), rank=state.rank,
            world_size=state.world_size, timeout=timeout,
            device_id=torch.device("cuda", device) if device is not None and "nccl" in backend else None)
    _STATE = state
    return state


def exports(state: DistState, cuda_device: int | None) -> dict[str, str]:
    """The env:// variables to export: the state's, with LOCAL_RANK = the CUDA index in use (when on CUDA)."""
    env = state.env()
    if cuda_device is not None:
        env["LOCAL_RANK"] = str(cuda_device)
    return env


def get_state() -> DistState:
    """The state `init_distributed()` settled on; before that call, what `detect()` reads now (nothing joined)."""
    return _STATE if _STATE is not None else detect()


def shutdown() -> None:
    """Leave the process group (if any), undo init_distributed's exports, forget the state: end of a run or test.
    Also drops the references libraries keep to the destroyed groups (`teardown.release_group_references`)."""
    global _STATE
    import torch.distributed as torch_dist

    from mona_dist.teardown import release_group_references

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
        release_group_references()
    for key, value in _PREVIOUS_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _PREVIOUS_ENV.clear()
    _STATE = None


def finish() -> None:
    """The clean end of a run, called by every rank: wait for all of them, then `shutdown()`.

    The barrier makes every rank's last collective complete before any rank goes on, and the groups are torn down
    while the interpreter is alive (torch's documentation asks every job to call `destroy_process_group()` at its
    end). Why that alone does not always keep a gloo job from aborting at exit, and what does: `mona_dist.teardown`
    (issue 19: `mona-dist bench` aborted in about 1 run in 8 before, a 2-rank test worker still in 1 CI run).
    """
    barrier()
    shutdown()


def leave(wait_for_peers: bool) -> None:
    """End of a command: `finish()` if this process joined a group (all ranks got here), or just `shutdown()`
    without a barrier when it is leaving on an error that other ranks may never reach."""
    if _STATE is None:
        return
    if wait_for_peers:
        finish()
    else:
        shutdown()


def _joined() -> bool:
    import torch.distributed as torch_dist

    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if _joined():
        import torch.distributed as torch_dist

        torch_dist.barrier()


def all_reduce_max(x: T) -> T:
    """Maximum of `x` over ranks (a number or a tensor, returned as the same kind); e.g. peak memory per rank."""
    if not _joined():
        return x
    import torch
    import torch.distributed as torch_dist

    on_cuda = torch_dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    if isinstance(x, torch.Tensor):
        out = x.detach().clone().to(device)
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)
        return out.to(x.device)  # type: ignore[return-value]
    buf = torch.tensor([x], dtype=torch.float64 if isinstance(x, float) else torch.int64, device=device)
    torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.MAX)
    return type(x)(buf.item())  # type: ignore[call-arg]


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's picklable `obj`, in rank order, on `dst` (None elsewhere); `[obj]` in a single process."""
    if not _joined():
        return [obj]
    import torch.distributed as torch_dist

    out = [None] * torch_dist.get_world_size() if torch_dist.get_rank() == dst else None
    torch_dist.gather_object(obj, out, dst=dst)
    return out


def rank0_decides(dist: DistState, fn: Callable[..., T], *args: Any) -> T:
    """Collective: `fn(*args)` run on rank 0 alone, its result (or its one-line ValueError / FileNotFoundError)
    handed to every rank. For a decision every rank must take alike (which checkpoint, is it valid, is a step
    already saved) where ranks looking for themselves could see different files and part ways in a collective."""
    box: list[Any] = [None]
    if dist.is_main:
        try:
            box[0] = ("ok", fn(*args))
        except (ValueError, FileNotFoundError) as err:
            box[0] = ("error", type(err).__name__, str(err))
    if _joined():
        import torch.distributed as torch_dist

        torch_dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise (FileNotFoundError if box[0][1] == "FileNotFoundError" else ValueError)(box[0][2])
    return box[0][1]
