"""Run set-up, shared by every command that runs a task model (train, eval, predict, export): the ranks, the
resolved config, the task's checks, the process group, and the model and engine built the same way each time, so
that eval, predict and export rebuild exactly the frozen weights the run trained on (a checkpoint's fingerprint
checks it). The training loop (`loop.py`) starts from what this gives it."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as tdist

from mona_dist.adapters.io import adapter_metadata
from mona_dist.config import Config
from mona_dist.config.resolve import resolve_batch
from mona_dist.config.schema import EngineConfig
from mona_dist.distributed import DistState, init_distributed, process_group_backend
from mona_dist.engine import Engine, build_engine
from mona_dist.models.pretrained import loading_policy
from mona_dist.tasks import TASKS, Task
from mona_dist.train.checkpoint import frozen_fingerprint
from mona_dist.train.rng import seed_everything


def start(cfg: Config) -> tuple[DistState, Config, Any, Task]:
    """Collective. The start-up every command that runs a task model shares (train, eval, predict): ranks, the
    resolved batch, the task's and DeepSpeed's config checks, the process group."""
    dist = init_distributed(cpu_collectives=host_collectives(cfg.engine))
    cfg, batch_plan = resolve_batch(cfg, dist.world_size)  # micro-batch and accumulation from the global batch
    task = TASKS.get(cfg.task)
    task.check(cfg)
    if cfg.engine.name == "deepspeed":  # the merged DeepSpeed JSON is checked before anything is built
        from mona_dist.engine.deepspeed_engine import deepspeed_config

        deepspeed_config(cfg.engine, cfg.data.batch_size, dist.world_size)
    join_group(dist, cfg)
    return dist, cfg, batch_plan, task


def join_group(dist: DistState, cfg: Config) -> None:
    """DeepSpeed and fairscale need a process group even for one rank: a private in-memory one does."""
    if cfg.engine.name != "ddp" and not tdist.is_initialized():
        backend = process_group_backend(torch.cuda.is_available(), host_collectives(cfg.engine))
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)


def host_collectives(engine: EngineConfig) -> bool:
    """Whether the run reduces host tensors: FSDP2 with CPU offload (its shards and gradients live on the host)."""
    return engine.name == "fsdp" and engine.offload_params


def build_task_model(cfg: Config, task: Task) -> tuple[torch.nn.Module, list]:
    """(the task's model, its pretrained-load reports), built from `train.seed`: the same frozen weights and initial
    tensors on every rank and in every command that rebuilds a run's model (train, eval, predict, export)."""
    seed_everything(cfg.train.seed)
    with loading_policy(strict=cfg.model.pretrained_strict) as pretrained_reports:
        model = task.build_model(cfg)
    return model, pretrained_reports


def model_meta(cfg: Config) -> dict[str, Any]:
    """What a checkpoint records of the model, so that a resume with another one names the field that differs
    (the frozen-weight fingerprint alone could only say that something did)."""
    return {"backbone": cfg.model.backbone, "method": cfg.model.method,
            "method_options": json.loads(json.dumps(cfg.model.method_options))}  # as meta.json gives it back


def build_model_and_engine(cfg: Config, task: Task, dist: DistState) -> tuple[Engine, dict, list, dict]:
    """(engine, checkpoint meta, pretrained reports, adapter-file metadata). The model is built from `train.seed` on
    every rank, so its frozen weights are the same in train, eval and predict (meta's fingerprint checks it against
    a checkpoint)."""
    model, pretrained_reports = build_task_model(cfg, task)
    meta = {"engine": cfg.engine.name, "zero_stage": cfg.engine.zero_stage, "task": cfg.task,
            **model_meta(cfg), "frozen_fingerprint": frozen_fingerprint(model)}
    # from the plain model, before an engine wraps it: the adapter files describe what they were saved from
    adapter_meta = adapter_metadata(model, task=cfg.task, pretrained=cfg.model.pretrained)
    seed_everything(cfg.train.seed + dist.rank)  # dropout / drop-path differ per rank
    engine = build_engine(model, cfg.engine, cfg.optim, micro_batch_size=cfg.data.batch_size,
                          world_size=dist.world_size, fixed_shape=task.fixed_shape)
    return engine, meta, pretrained_reports, adapter_meta
