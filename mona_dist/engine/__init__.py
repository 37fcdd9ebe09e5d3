"""Engines: functions applied to a plain model (FSDP2 / DeepSpeed / fairscale / DDP), plus activation
checkpointing and per-block compile, applied in that order: checkpointing, compile, then the engine.

`build_engine(model, cfg, optim, micro_batch_size, world_size)` picks the engine named by
`cfg.name`; the heavy libraries are imported only for the engine that is used.
"""

from __future__ import annotations

import torch
from torch import nn

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine.activation import enable_activation_checkpointing
from mona_dist.engine.base import Engine, move_batch, pick_device
from mona_dist.engine.optim import LRSchedule, param_groups
from mona_dist.extras import require

__all__ = [
    "Engine",
    "LRSchedule",
    "build_engine",
    "configure_backends",
    "enable_activation_checkpointing",
    "move_batch",
    "param_groups",
    "pick_device",
]


def build_engine(model: nn.Module, cfg: EngineConfig, optim: OptimConfig, *, micro_batch_size: int,
                 world_size: int = 1, device: torch.device | None = None, fixed_shape: bool = False) -> Engine:
    """Wrap `model` for training on `device` (default `pick_device()`: this rank's GPU, else the CPU).
    Multi-rank (and fsdp/fairscale/DeepSpeed) need an initialised process group. `fixed_shape` says the task
    trains on inputs of one (or a few) shapes: `engine.cudnn_benchmark` then defaults to on."""
    if cfg.name == "fairscale":
        require("engine fairscale", "fairscale")  # an optional extra: one line before the model is touched
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.compile:
        from mona_dist.engine.compile import compile_blocks

        compile_blocks(model)
    device = device if device is not None else pick_device()
    configure_backends(cfg, device)
    if cfg.name == "deepspeed":
        from mona_dist.engine.deepspeed_engine import DeepSpeedEngine

        engine: Engine = DeepSpeedEngine(model, cfg, optim, device, micro_batch_size, world_size)
    elif cfg.name == "fsdp":
        from mona_dist.engine.fsdp_engine import FSDPEngine

        engine = FSDPEngine(model, cfg, optim, device)
    elif cfg.name == "fairscale":
        from mona_dist.engine.fairscale_engine import FairscaleEngine

        engine = FairscaleEngine(model, cfg, optim, device)
    else:
        from mona_dist.engine.ddp_engine import DDPEngine

        engine = DDPEngine(model, cfg, optim, device)
    engine.cudnn_benchmark = device.type == "cuda" and (cfg.cudnn_benchmark if cfg.cudnn_benchmark is not None
                                                        else fixed_shape)
    return engine


def configure_backends(cfg: EngineConfig, device: torch.device) -> None:
    """TF32 for the fp32 matmuls and convolutions on CUDA (`engine.tf32`); process-wide, as torch's flags are."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
