"""`mona-dist eval`: a checkpoint's metrics on the val shards, computed by the trainer's own evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mona_dist.config import Config, apply_overrides, read_yaml, validate


def eval_config(path: str, overrides: list[str], shards: str | None) -> Config:
    """The run's config with `--set` overrides; `--shards` replaces data.val_shards (taken verbatim, not as YAML:
    a brace pattern `{000..003}` would read as a mapping)."""
    data = apply_overrides(read_yaml(path), overrides)
    if shards is not None:
        data.setdefault("data", {})["val_shards"] = shards
    cfg = validate(data)
    if not cfg.data.val_shards:
        raise ValueError("no val shards to evaluate: set data.val_shards in the config or give --shards SPEC")
    return cfg


def run_eval(cfg: Config, checkpoint: str, out: str | None) -> dict[str, float]:
    """Collective. The metrics (valid on rank 0, {} elsewhere for detection tasks); rank 0 writes them to
    `out`/metrics.json and `out`/tb when `out` is given, and prints them as one JSON line."""
    from mona_dist.infer.restore import restore
    from mona_dist.train.evaluation import evaluate

    if out is not None and Path(out).resolve() == Path(cfg.output_dir).resolve():
        raise ValueError(f"--out {out} is the run's output_dir; eval writes elsewhere (e.g. {out}/eval)")
    r = restore(cfg, checkpoint)
    loader = r.task.build_loader(r.cfg, "val", r.dist)
    metrics = evaluate(r.task, r.engine, loader, r.dist)
    if r.dist.is_main:
        for note in r.notes:
            print(note, flush=True)
        record: dict[str, Any] = {"step": r.step, "checkpoint": str(r.checkpoint), **metrics}
        if out is not None:
            write_metrics(Path(out), r.step, record, metrics)
        print(json.dumps(record), flush=True)
    return metrics


def write_metrics(out: Path, step: int, record: dict[str, Any], metrics: dict[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    tb = SummaryWriter(str(out / "tb"))
    try:
        for key, value in metrics.items():
            tb.add_scalar(key, value, step)
    finally:
        tb.close()
