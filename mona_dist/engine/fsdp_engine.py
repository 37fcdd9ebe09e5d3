"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and AdamW state sharded over the ranks.

As torchtitan applies it: `fully_shard` on each transformer block (the backbone names them, `models.block_units`;
activation checkpointing and compile wrapped them first), then on the root model, whose group holds everything
else (patch embedding, merges, output norms, highway adapters, neck and heads). Frozen weights are sharded like
the trainable ones; only the trainable reach AdamW, so the frozen ones hold no gradient and no optimizer state.

- Mixed precision (`engine.precision: bf16 | fp16`): `MixedPrecisionPolicy` gathers the weights in the compute
  dtype, reduces gradients in fp32 and keeps the fp32 shards as the master weights the optimizer steps. Buffers
  are not cast (as DeepSpeed 0.19), so `precision.match_engine_dtype` settles BatchNorm, the other buffers and the
  preprocessor's output dtype as for DeepSpeed. The root does not cast its inputs: box coordinates stay fp32; the
  preprocessor hands the backbone the compute dtype. fp16 adds a loss scaler (`fsdp_grad_scaler`).
- The E3VA highway calls `block.taps(x)` instead of the block's forward, so it is registered as a forward method
  (`register_fsdp_forward_method`); without it the block's weights stay sharded there ("got mixed torch.Tensor
  and DTensor").
- Buffers are not sharded: each rank keeps its own. Plain BatchNorm statistics (UperNet's heads on CPU) are sent
  from rank 0 before every forward, as DDP does for them (`engine.broadcast_buffers`, same default).
- Gradient accumulation reduce-scatters each micro-batch into the shards: no unsharded gradient waits between
  micro-batches (FSDP's memory, one reduce-scatter per micro-batch).
- State: torch.distributed.checkpoint (DCP) under `<dir>/engine/`, each rank writing its own shards of the
  trainable weights and of AdamW's state, by FQN. DCP reshards on load, so a checkpoint resumes on another world
  size (`reshards`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _BatchNorm

from mona_dist.adapters.io import clean_name
from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine.base import DTYPES, Engine
from mona_dist.engine.ddp_engine import needs_buffer_broadcast
from mona_dist.engine.optim import build_adamw, param_groups
from mona_dist.engine.precision import match_engine_dtype
from mona_dist.models import block_units

TAG = "engine"
# Only the trainable tensors are saved: the frozen ones are rebuilt from the seed and the pretrained file (the
# checkpoint's frozen-weight fingerprint checks that). Frozen entries are therefore missing on load, by design.
SAVE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class FSDPEngine(Engine):
    name = "fsdp"
    reshards = True

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, device: torch.device):
        if not tdist.is_initialized():
            raise RuntimeError("the fsdp engine needs an initialised process group (even for one rank)")
        super().__init__(model.to(device), cfg, device)
        mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
        self._dtype = DTYPES[cfg.precision] if cfg.precision != "fp32" else None
        reduce = torch.float32 if self._dtype is not None else None
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.offload_params else OffloadPolicy()
        reshard = cfg.reshard_after_forward if cfg.reshard_after_forward is not None else True
        units = [getattr(parent, attr) for parent, attr in block_units(model)]
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload,
                        mp_policy=MixedPrecisionPolicy(param_dtype=self._dtype, reduce_dtype=reduce))
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload,
                    mp_policy=MixedPrecisionPolicy(param_dtype=self._dtype, reduce_dtype=reduce,
                                                   cast_forward_inputs=False))
        for unit in units:
            if callable(getattr(unit, "taps", None)):
                register_fsdp_forward_method(unit, "taps")
        if self._dtype is not None:
            match_engine_dtype(model, self._dtype)
        self.optimizer = build_adamw(param_groups(model, optim), optim, foreach=self.foreach)
        self.scaler = fsdp_grad_scaler(device) if cfg.precision == "fp16" else None
        self._accum = cfg.grad_accum
        broadcast = cfg.broadcast_buffers if cfg.broadcast_buffers is not None else needs_buffer_broadcast(model)
        self._shared_buffers: dict[torch.dtype, list[torch.Tensor]] = {}
        if broadcast and tdist.get_world_size() > 1:
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    for buf in m.buffers():
                        self._shared_buffers.setdefault(buf.dtype, []).append(buf)

    def __call__(self, batch: Any) -> Any:
        with torch.no_grad():
            for bufs in self._shared_buffers.values():  # one broadcast per dtype, as DDP's buffer sync
                flat = _flatten_dense_tensors(bufs)
                tdist.broadcast(flat, src=0)
                for buf, synced in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
                    buf.copy_(synced)
        return super().__call__(batch)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the policy gathers the weights in the compute dtype

    def image_dtype(self) -> torch.dtype | None:
        return self._dtype

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # every micro-batch reduce-scatters into the shards (module docstring)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self._accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = self._trainable()
        grads = [p.grad for p in params if p.grad is not None]
        # Each rank holds the norm of its shards; the global norm is one all-reduce away (as torchtitan does it).
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=self.foreach or None)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm, foreach=self.foreach or None)
        self.grad_norm = norm.detach()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- state ---------------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=SAVE_OPTIONS)
        state = {"model": model_state, "optimizer": optim_state}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        dcp.save(state, checkpoint_id=str(Path(directory) / TAG))

    def load(self, directory: Path) -> None:
        path = Path(directory) / TAG
        if not (path / ".metadata").is_file():
            raise ValueError(f"checkpoint {directory} has no FSDP state ({TAG}/.metadata); was it written by "
                             "another engine?")
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=SAVE_OPTIONS)
        state = {"model": model_state, "optimizer": optim_state}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as err:  # DCP reports a planning failure on every rank as one CheckpointException
            first = next((line.strip() for line in str(err).splitlines() if "Missing key" in line or "Size mismatch"
                          in line), str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            raise ValueError(f"checkpoint {path} does not fit this model: {first[:300]}") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=LOAD_OPTIONS)
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    @contextlib.contextmanager
    def exported(self) -> Iterator[nn.Module]:
        """The model with every group's weights gathered (in the compute dtype under a bf16/fp16 policy)."""
        groups = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for m in groups:
            m.unshard()
        try:
            yield self.model
        finally:
            for m in groups:
                m.reshard()

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """Collective: every trainable tensor gathered whole from the fp32 shards (the master weights)."""
        out = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:  # same order on every rank: each gather is collective
                full = p.full_tensor() if isinstance(p, DTensor) else p
                # a copy: on one CPU rank the gathered tensor is the live weight itself
                out[clean_name(name)] = full.detach().to("cpu", copy=True)
        return out


def fsdp_grad_scaler(device: torch.device):
    """A dynamic loss scaler for fp16 over sharded gradients (every rank must agree on inf/nan)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device.type)
