"""Where training memory goes, counted exactly: model state, saved activations, and the readings of the device.

- `saved_activation_bytes`: every tensor autograd keeps for backward during a forward, via
  `torch.autograd.graph.saved_tensors_hooks`, each storage counted once, parameters excluded (they are model state)
  by storage and by identity (ZeRO-3 and FSDP2 save the weights they gathered, in storages of their own).
- `model_state_bytes`: parameters + gradients + optimizer state held by *this rank* (the ZeRO paper's "model
  state"): read from the tensors themselves, so ZeRO sharding and fp32 master copies show as they really are.
- `zero_model_state_estimate`: the ZeRO paper's arithmetic for the same quantity, printed beside the measurement;
  `fsdp_model_state_estimate` the same for FSDP2, which shards everything 1/world and keeps fp32 shards.
- `LiveTensorPeak`: the most tensor bytes alive at once over a step, the model state included: on CPU, what CUDA
  `max_memory_allocated` reads on a GPU (temporaries and gradients in flight, not only what autograd saves).
- `PeakMemory`: CUDA `max_memory_allocated` since a reset on GPU; on CPU the process's peak RSS (VmHWM), reset
  through /proc/self/clear_refs, both relative to what was allocated before the measured step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: an FSDP2 parameter, gradient or AdamW moment is a DTensor over its shards."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    t = _local(t)
    return (str(t.device), t.untyped_storage().data_ptr())


def _storage_bytes(t: torch.Tensor) -> int:
    return _local(t).untyped_storage().nbytes()


def saved_activation_bytes(
    fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = (), checkpointed: Iterable[nn.Module] = (),
    storages: dict[tuple[str, int], int] | None = None,
) -> tuple[int, Any]:
    """Bytes of the distinct storages kept for backward while running `fn()`, minus those of `exclude`; and fn's result.

    Non-reentrant activation checkpointing keeps the *inputs* of each checkpointed module by reference (its own
    hooks replace every saved tensor inside by a placeholder), so the inputs of `checkpointed` modules are counted
    too. Storages are held until the count is done, so memory freed mid-forward cannot be reused and counted twice.
    `storages`, if given, receives what was counted: (device, address) -> bytes.
    """
    exclude = list(exclude)
    skip = {_storage_key(t) for t in exclude if _local(t).numel() > 0}
    # ids of objects `exclude` keeps alive (an FSDP2 shard's local tensor is an attribute of its DTensor)
    ids = {id(t) for t in exclude} | {id(t._local_tensor) for t in exclude if hasattr(t, "_local_tensor")}
    seen: dict[tuple[str, int], int] = {} if storages is None else storages
    held: list[torch.Tensor] = []

    def is_parameter(t: torch.Tensor) -> bool:
        """A parameter, or a view of one (`weight.t()` for a linear), by identity. Under ZeRO-3 the parameter is
        gathered into the same object (its `ds_id` marks it) and under FSDP2 into an unsharded twin, both with
        storages that are neither the shard nor any storage known before the forward."""
        base = t._base if t._base is not None else t
        return isinstance(base, nn.Parameter) or hasattr(base, "ds_id") or id(base) in ids

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in skip and not is_parameter(t):
            seen[key] = _storage_bytes(t)
            held.append(t)
        return t

    def keep_input(_module, args):
        if torch.is_grad_enabled():
            for t in args:
                if isinstance(t, torch.Tensor):
                    pack(t)

    hooks = [m.register_forward_pre_hook(keep_input) for m in checkpointed]
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values()), out


def _base_optimizer(opt: Any) -> Any:
    """The torch optimizer at the bottom of wrappers (DeepSpeed's ZeRO/BF16 optimizers, fairscale's OSS)."""
    for _ in range(4):
        inner = getattr(opt, "optimizer", None) or getattr(opt, "optim", None)
        if inner is None or inner is opt:
            break
        opt = inner
    return opt


def model_state_tensors(model: nn.Module, optimizer: Any = None) -> dict[str, list[torch.Tensor]]:
    """{'params', 'grads', 'optimizer'}: the tensors of the model's state on this rank (see model_state_bytes)."""
    params = [getattr(p, "ds_tensor", p) if p.numel() == 0 else p for p in model.parameters()]
    out = {"params": params, "grads": [p.grad for p in model.parameters() if p.grad is not None], "optimizer": []}
    base = _base_optimizer(optimizer) if optimizer is not None else None
    if isinstance(base, torch.optim.Optimizer):
        masters = [p for g in base.param_groups for p in g["params"]]
        out["params"] += masters
        out["grads"] += [p.grad for p in masters if p.grad is not None]
        out["optimizer"] = [t for st in base.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return out


def model_state_bytes(model: nn.Module, optimizer: Any = None) -> dict[str, int]:
    """{'params', 'grads', 'optimizer', 'total'}: distinct storages this rank holds for the model's state.

    The ZeRO paper's model state: the model's parameters (this rank's shard under ZeRO-3, `p.ds_tensor`) and their
    gradients, plus what the innermost torch optimizer holds: its parameters where they are separate tensors (the
    fp32 master partitions of ZeRO-1/2/3 and of bf16 training), their gradients, and its state (Adam's moments).
    Communication buckets and other engine buffers are not model state and are not counted.
    """
    seen: set[tuple[str, int]] = set()

    def take(ts: Iterable[torch.Tensor]) -> int:
        total = 0
        for t in ts:
            if _local(t).numel() == 0:
                continue
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                total += _storage_bytes(t)
        return total

    out = {k: take(ts) for k, ts in model_state_tensors(model, optimizer).items()}  # params, grads, optimizer
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def zero_model_state_estimate(
    trainable: int, frozen: int, precision: str, zero_stage: int, world_size: int
) -> dict[str, int]:
    """Model-state bytes per rank by the ZeRO paper's accounting (Rajbhandari et al., 2020), Adam optimizer.

    Weights and grads in the training precision (2 bytes for bf16/fp16, 4 for fp32); Adam's two moments in fp32;
    an fp32 master copy of the trainable weights under bf16/fp16. Stage 1 shards optimizer state, stage 2 also the
    gradients, stage 3 also the weights (frozen ones included). Frozen weights need no grads and no optimizer state.
    """
    b = 4 if precision == "fp32" else 2
    n = max(world_size, 1)
    opt = trainable * (8 + (4 if b == 2 else 0))
    params = (trainable + frozen) * b
    grads = trainable * b
    return {
        "params": params // n if zero_stage >= 3 else params,
        "grads": grads // n if zero_stage >= 2 else grads,
        "optimizer": opt // n if zero_stage >= 1 else opt,
        "total": (params // n if zero_stage >= 3 else params)
        + (grads // n if zero_stage >= 2 else grads)
        + (opt // n if zero_stage >= 1 else opt),
    }


def fsdp_model_state_estimate(trainable: int, frozen: int, world_size: int) -> dict[str, int]:
    """Model-state bytes per rank under FSDP2 (`engine.name: fsdp`), Adam optimizer: every weight, gradient and
    moment sharded 1/world. The shards stay fp32 whatever the compute dtype (they are the master weights; a
    bf16/fp16 policy gathers low-precision copies only for the duration of a block's forward and backward), and
    frozen weights need no grads and no optimizer state. Shards are padded to a multiple of the world size."""
    n = max(world_size, 1)
    out = {"params": (trainable + frozen) * 4 // n, "grads": trainable * 4 // n, "optimizer": trainable * 8 // n}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


class LiveTensorPeak(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while the mode is on (`peak`, from `base`).

    `base`: the distinct storages of `held` (the model state at entry: parameters, buffers, gradients, optimizer
    state). On top: every storage an op creates while the mode is on (an output that shares no storage with the
    op's inputs; views and in-place results are not new memory), until it is freed: torch keeps one Python object
    per storage, and a finalizer on it runs when the last tensor, view or saved-for-backward reference is gone.
    The autograd engine runs a CPU backward on the calling thread under the same mode, so gradients and the
    backward's temporaries are counted. What a kernel allocates and frees inside itself (a oneDNN scratchpad) is
    not seen; on CUDA, `max_memory_allocated` sees those too and reads the device instead.
    """

    def __init__(self, held: Iterable[torch.Tensor] = (), device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self._held: set[int] = set()
        self.base = 0
        for t in held:
            t = _local(t)
            if t.numel() and t.untyped_storage()._cdata not in self._held:
                self._held.add(t.untyped_storage()._cdata)
                self.base += t.untyped_storage().nbytes()
        self._live: dict[int, int] = {}  # storage -> bytes, for the storages created under the mode
        self.current = self.peak = self.base

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # torch.tensor(data) builds its tensor outside the dispatcher and hands it to lift_fresh: new memory
        fresh = func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
        inputs = set() if fresh else {_local(t).untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                                      if isinstance(t, torch.Tensor) and _local(t).device == self.device}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or _local(t).device != self.device:
                continue
            storage = _local(t).untyped_storage()
            key = storage._cdata
            if key in self._live:  # an out= or in-place op may have resized a storage created here
                grown = storage.nbytes() - self._live[key]
                self._live[key] += grown
                self.current += grown
            elif key not in inputs and key not in self._held:
                self._live[key] = storage.nbytes()
                self.current += self._live[key]
                weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.current)
        return out


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@dataclass
class PeakMemory:
    """Peak memory of the code run between `start()` and `stop()`, above what was held at `start()`.

    On CUDA: `max_memory_allocated` (exact allocator bytes). On CPU: peak RSS (includes allocator slack and
    anything else the process touched; a coarser, real reading beside the exact accounting).
    """

    device: torch.device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError:
                pass
            self.base = _rss_kib("VmRSS") * 1024

    def stop(self) -> int:
        """Peak bytes above the start; on CUDA also callable as the absolute peak via `absolute`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.absolute = torch.cuda.max_memory_allocated(self.device)
        else:
            self.absolute = _rss_kib("VmHWM") * 1024
        return max(self.absolute - self.base, 0)
