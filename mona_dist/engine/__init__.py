"""Engines: functions applied to a plain model (DeepSpeed / fairscale / DDP), plus activation checkpointing.

`build_engine(model, cfg, optim, micro_batch_size, world_size)` picks the engine named by
`cfg.name`; the heavy libraries are imported only for the engine that is used.
"""

from __future__ import annotations

from torch import nn

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine.activation import enable_activation_checkpointing
from mona_dist.engine.base import Engine, move_batch, pick_device
from mona_dist.engine.optim import LRSchedule, param_groups

__all__ = [
    "Engine",
    "LRSchedule",
    "build_engine",
    "enable_activation_checkpointing",
    "move_batch",
    "param_groups",
    "pick_device",
]


def build_engine(model: nn.Module, cfg: EngineConfig, optim: OptimConfig, *, micro_batch_size: int,
                 world_size: int = 1) -> Engine:
    """Wrap `model` for training. Multi-rank (and fairscale/DeepSpeed) need an initialised process group."""
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    device = pick_device()
    if cfg.name == "deepspeed":
        from mona_dist.engine.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, optim, device, micro_batch_size, world_size)
    if cfg.name == "fairscale":
        from mona_dist.engine.fairscale_engine import FairscaleEngine

        return FairscaleEngine(model, cfg, optim, device)
    from mona_dist.engine.ddp_engine import DDPEngine

    return DDPEngine(model, cfg, optim, device)
