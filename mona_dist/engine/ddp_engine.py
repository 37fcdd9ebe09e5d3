"""Plain torch: DistributedDataParallel across ranks, the bare model in a single process.

State goes to one `engine.pt` written by rank 0: trainable weights, AdamW state and the fp16 grad scaler. The
state is whole, so it loads on any world size (`reshards`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.adapters.io import copy_trainable, trainable_state_dict
from mona_dist.engine.base import Engine
from mona_dist.engine.optim import build_adamw, param_groups
from mona_dist.serialization import safe_torch_load

STATE_FILE = "engine.pt"


def _world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


class TorchEngine(Engine):
    """Shared by the ddp and fairscale engines: torch optimizer, autocast, optional fp16 grad scaler."""

    reshards = True  # engine.pt holds whole states (fairscale consolidates OSS's shards before saving)

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, device: torch.device):
        super().__init__(model.to(device), cfg, device)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self._accum = cfg.grad_accum

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self._accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self.grad_norm = self.clip(self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf).detach()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def discard_step(self) -> None:
        self.zero_grad()

    def optimizer_state(self) -> dict | None:
        """Full optimizer state on rank 0 (None elsewhere); collective for sharded optimizers."""
        return self.optimizer.state_dict() if _world()[0] == 0 else None

    def save(self, directory: Path) -> None:
        optim_state = self.optimizer_state()
        if _world()[0] == 0:
            # state_dict names: activation-checkpoint wrappers must not leak into the file (resume without them)
            state = {"model": {k: v.cpu() for k, v in trainable_state_dict(self.model).items()}, "optimizer": optim_state}
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, Path(directory) / STATE_FILE)

    def load(self, directory: Path) -> None:
        path = Path(directory) / STATE_FILE
        state = safe_torch_load(path)
        if not isinstance(state, dict) or not {"model", "optimizer"} <= state.keys():
            raise ValueError(f"checkpoint {path} was not written by the {self.name} engine")
        copy_trainable(self.model, state["model"], f"checkpoint {path}")  # one-line error for another model's file
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def needs_buffer_broadcast(model: nn.Module) -> bool:
    """Whether DDP must send rank 0's buffers at every forward: only for BatchNorm statistics that each rank
    would otherwise keep for itself (SyncBatchNorm's are equal already; Swin and ViT hold no such buffers)."""
    return any(isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm) and m.track_running_stats
               for m in model.modules())


class DDPEngine(TorchEngine):
    name = "ddp"

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, device: torch.device):
        super().__init__(model, cfg, optim, device)
        self.optimizer = build_adamw(param_groups(self.model, optim), optim, foreach=self.foreach)
        if _world()[1] > 1:
            ids = [device.index] if device.type == "cuda" else None
            broadcast = cfg.broadcast_buffers if cfg.broadcast_buffers is not None else needs_buffer_broadcast(model)
            # gradient_as_bucket_view: gradients live in DDP's buckets instead of beside them (one copy fewer);
            # zero_grad(set_to_none) is fine with it, DDP re-creates the views at the next backward.
            self.module = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=broadcast,
                                                  gradient_as_bucket_view=cfg.gradient_as_bucket_view)
