"""A task model restored from a run's checkpoint, ready for eval mode: what `eval` and `predict` share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mona_dist.config import Config
from mona_dist.distributed import DistState, rank0_decides
from mona_dist.engine import Engine
from mona_dist.tasks import Task
from mona_dist.train.checkpoint import resolve_resume, restore_model


@dataclass
class Restored:
    cfg: Config  # as resolved for this world size
    dist: DistState
    task: Task
    engine: Engine
    checkpoint: Path
    step: int
    notes: list[str] = field(default_factory=list)


def find_checkpoint(output_dir: str | Path, spec: str) -> tuple[Path, str | None]:
    """`latest`: the newest complete checkpoint of output_dir (as `--resume auto` finds it); else a step
    directory, a checkpoints/ directory or an output_dir."""
    if spec == "auto":
        raise ValueError("--checkpoint auto: give `latest` or a checkpoint directory")
    return resolve_resume(output_dir, spec, flag="--checkpoint")  # the trainer's finder; `latest` must find one


def restore(cfg: Config, spec: str) -> Restored:
    """Collective. Ranks, the model and engine as the run built them, the checkpoint `spec` loaded, eval mode."""
    from mona_dist.train.setup import build_model_and_engine, start

    dist, cfg, _, task = start(cfg)
    path, note = rank0_decides(dist, find_checkpoint, cfg.output_dir, spec)  # rank 0 looks; its answer or error on all
    engine, meta, _, _ = build_model_and_engine(cfg, task, dist)
    saved, notes = restore_model(path, engine, dist, expect=meta)
    engine.train(False)
    return Restored(cfg, dist, task, engine, path, int(saved["step"]), ([note] if note else []) + notes)
