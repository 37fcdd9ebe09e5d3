"""Workarounds for DeepSpeed on this stack, each with the reason.

1. Stale process groups (`drop_stale_groups`). DeepSpeed 0.19 caches the groups it creates in module globals of
`deepspeed.utils.groups` (`_WORLD_GROUP`, a clone of the world made on the first `deepspeed.initialize`) and never
checks them again. Once the process group is destroyed (every mona-dist command leaves its group before it returns:
`distributed.finish`) and a new one formed in the same process (a second run, the test suite), the next
`deepspeed.initialize` hands torch the dead group: "Group ... is not registered, please create group with
torch.distributed.new_group API". Before each initialize, cached groups torch no longer knows are dropped, so
DeepSpeed makes new ones.

2. /dev/shm buffers (`release_cpu_allreduce_buffer`). DeepSpeed 0.19's CPU accelerator runs all-reduce through shared memory when every rank is on one machine
(LOCAL_SIZE == world size, which the deepspeed launcher sets). Each rank creates
/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, 66 MB, in `shm_initialize`. Nothing
ever unlinks it: `shared_close` in ops/csrc/cpu/comm/shm.cpp has no caller. So every CPU run, finished or killed,
leaves its buffers in RAM-backed /dev/shm. A few passes of our test suite filled 19 GB of a 24 GiB machine with
them, and the next pass stalled in swap.

Once every rank has mapped every buffer, the names are no longer needed. Unlinking them leaves the mappings
working, and the kernel frees the memory when the last rank exits, however it exits.

3. Optimizer state of every parameter group but the first (`link_optimizer_states`). ZeRO 1-2 in DeepSpeed 0.19
steps its parameter groups one at a time (`_optimizer_step(i)`), and after the first group's step links each
parameter to its Adam moments (`_lazy_init_hp_params_optimizer_state`) and marks that done. The other groups have no
state yet at that moment, so their parameters are linked to nothing, for good, and
`deepspeed.utils.safe_get_full_optimizer_state` fails on them: "exp_avg not found in optimizer state fragment".
Every run with more than one group (the recipes' paramwise weight-decay groups) hit it at its first checkpoint.
Parameters left unlinked are linked again, to the state that exists by then.

4. One JIT build of DeepSpeed's CPU ops per environment (`use_one_jit_build`). DeepSpeed JIT-builds its CPU
shared-memory op (and CPUAdam) with torch's cpp_extension, which runs the first `ninja` on PATH in
TORCH_EXTENSIONS_DIR (default: the shared ~/.cache/torch_extensions). Where two ninjas exist (the venv's, from
PyPI, 1.13, and Debian's /usr/bin/ninja, 1.11) and the processes of one run find different ones (the venv's bin is
on PATH under the deepspeed launcher and the console scripts, not under `.venv/bin/python`), each ninja hashes the
command lines in `.ninja_log` its own way (1.12 changed the hash), reads the other's build as "command line
changed" and rebuilds: measured 80-140 s per process start on this machine, alternating for hours. A second venv
or clone sharing ~/.cache rebuilds the same way (its paths differ). So: the interpreter's own ninja first on PATH,
and the build kept inside the environment (`<venv>/torch_extensions`) unless TORCH_EXTENSIONS_DIR is set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, MutableMapping, Optional

from mona_dist.distributed import barrier, get_state

SHM_DIR = Path("/dev/shm")


def drop_stale_groups() -> list[str]:
    """Forget the process groups `deepspeed.utils.groups` cached that torch no longer knows; returns their names.

    Call before `deepspeed.initialize`. Groups still registered with torch are kept.
    """
    import torch.distributed as tdist
    from deepspeed.utils import groups

    def stale(group: object) -> bool:
        if not isinstance(group, tdist.ProcessGroup):
            return False
        if not tdist.is_initialized():
            return True
        try:
            tdist.get_global_rank(group, 0)  # public; raises "not registered" for a group of a destroyed world
        except (ValueError, RuntimeError):
            return True
        return False

    dropped = []
    for name, value in list(vars(groups).items()):
        if not (name.startswith("_") and name.endswith("_GROUP")):
            continue
        if stale(value):
            setattr(groups, name, None)
            dropped.append(name)
        elif isinstance(value, dict) and any(stale(g) for g in value.values()):
            value.clear()  # e.g. _EXPERT_PARALLEL_GROUP: name -> group, rebuilt on demand
            dropped.append(name)
    return dropped


def allreduce_buffer(rank: int, addr: str, port: int) -> Path:
    """The name DeepSpeed's shm.cpp gives rank `rank`'s all-reduce buffer."""
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_cpu_allreduce_buffer() -> Optional[Path]:
    """Call on every rank after `deepspeed.initialize`: unlinks this rank's buffer name; returns it if it existed.

    `shm_initialize` returns on a rank only after it has opened every other rank's buffer, and it runs inside
    deepspeed.initialize. A barrier after that call therefore means every buffer is mapped everywhere.
    """
    from deepspeed.accelerator import get_accelerator

    state = get_state()
    if get_accelerator().device_name() != "cpu" or state.world_size < 2:
        return None
    barrier()  # the same decision on every rank: it depends on the job, not on this rank's files
    path = allreduce_buffer(state.rank, state.master_addr, state.master_port)
    try:
        path.unlink()
    except FileNotFoundError:  # no shm all-reduce in this job (not all ranks local), or released already
        return None
    return path


def link_optimizer_states(optimizer: Any, params: Iterable[Any]) -> int:
    """Link the parameters DeepSpeed left without Adam moments to their group's state (workaround 3 above).

    `optimizer` is the DeepSpeed ZeRO 1-2 / bf16 optimizer (`engine.optimizer`); its base optimizer holds one flat
    fp32 partition per group. Returns how many parameters were linked; ZeRO-3 (no `_hp_mapping`) needs none.
    """
    base = getattr(optimizer, "optimizer", None)
    if base is None:
        return 0
    flats = [g["params"][0] if g["params"] else None for g in base.param_groups]
    linked = 0
    for p in params:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None or mapping.optim_fragment:
            continue
        flat = flats[mapping.param_group_index]
        if flat is not None and base.state.get(flat):
            mapping.set_optim_state_fragment(flat, base.state[flat])
            linked += 1
    return linked


def use_one_jit_build(env: MutableMapping[str, str] | None = None) -> None:
    """Workaround 4 above: this interpreter's ninja first on PATH, and, in a venv, the JIT builds kept in
    `<venv>/torch_extensions` unless TORCH_EXTENSIONS_DIR names a place. Call before DeepSpeed loads an op; child
    processes inherit both."""
    env = os.environ if env is None else env
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "").split(os.pathsep)
    if (Path(bin_dir) / "ninja").exists() and path[:1] != [bin_dir]:
        env["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p and p != bin_dir)])
    if sys.prefix != sys.base_prefix:  # a venv: its own build folder (elsewhere torch's default)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
