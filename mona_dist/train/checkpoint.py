"""Checkpoints that survive a kill at any instant, and resume that reproduces the uninterrupted run.

    <output_dir>/checkpoints/
        step-000020/            one complete checkpoint (written as .step-000020.partial/, renamed when done)
            engine/ | engine.pt   engine state: DeepSpeed's sharded format, or torch.save for ddp/fairscale
            rank-00000.pt ...     per rank: RNG states (python, numpy, torch, this rank's GPU) and the data position
            adapter.safetensors   the trainable weights alone (`mona_dist.adapters.save_adapter`)
            meta.json             written last: step, world size, engine, frozen-weight fingerprint
        latest -> step-000020   a symlink, replaced atomically (rename) only after the step directory is complete

A SIGKILL during a save leaves at most a `.partial` directory, which the next save removes; `latest` always points
at a complete checkpoint. Every file is read back with weights_only=True (see mona_dist/serialization.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from mona_dist.adapters import save_adapter
from mona_dist.distributed import DistState, barrier
from mona_dist.engine import Engine
from mona_dist.serialization import safe_torch_load

FORMAT = "mona-dist-checkpoint/1"
LATEST = "latest"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# -- RNG -----------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator the loop draws from, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This rank's own device only: a requeued job may see fewer GPUs per task (one, under --gpus-per-task=1).
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])


def frozen_fingerprint(model: torch.nn.Module) -> float:
    """A cheap checksum of the frozen weights: they are not saved, so a resume must rebuild exactly the same ones."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters() if not p.requires_grad and p.numel()) or 0.0)


# -- save ----------------------------------------------------------------------------------------------------------
def save_checkpoint(output_dir: str | Path, step: int, engine: Engine, loader: Any, dist: DistState,
                    meta: dict[str, Any], keep_last: int, counters: dict[str, int] | None = None) -> Path:
    """Collective. Writes `step-N/` completely, then points `latest` at it; a second save of the same step is a no-op."""
    root = checkpoint_root(output_dir)
    final, partial = root / step_name(step), root / f".{step_name(step)}.partial"
    if (final / "meta.json").is_file():
        barrier()
        return final
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    engine.save(partial)
    torch.save({"step": step, "rng": rng_state(), "loader": loader.state_dict(), "counters": counters or {}},
               partial / f"rank-{dist.rank:05d}.pt")
    weights = engine.trainable_weights()  # collective; fp32 masters under DeepSpeed bf16/fp16
    if dist.is_main:
        save_adapter(weights, partial / "adapter.safetensors", step=str(step))
    barrier()
    if dist.is_main:
        (partial / "meta.json").write_text(json.dumps({"format": FORMAT, "step": step, "world_size": dist.world_size,
                                                       **meta}, indent=1))
        _fsync_dir(partial)
        os.replace(partial, final)
        _point_latest(root, final.name)
        _prune(root, keep_last)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    """Flush the directory's files before the rename makes them visible as complete."""
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, root / LATEST)  # rename(2) over the old link: atomic


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "meta.json").is_file())
    current = (root / LATEST).resolve()
    for old in steps[:-keep_last]:
        if old.resolve() != current:
            shutil.rmtree(old, ignore_errors=True)


# -- resume --------------------------------------------------------------------------------------------------------
def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`latest`: must exist; `auto`: latest if there is one; a path: a step directory or a checkpoints directory."""
    if resume is None:
        return None
    latest = checkpoint_root(output_dir) / LATEST
    if resume in ("latest", "auto"):
        if latest.exists():
            return latest.resolve()
        if resume == "auto":
            return None
        raise FileNotFoundError(f"--resume latest: no checkpoint at {latest}")
    path = Path(resume)
    if (path / LATEST).exists():
        return (path / LATEST).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return path.resolve()


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a complete mona-dist checkpoint (meta.json missing)") from None
    except json.JSONDecodeError:
        raise ValueError(f"{path}/meta.json is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mona-dist checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def load_checkpoint(path: Path, engine: Engine, dist: DistState, expect: dict[str, Any]) -> dict[str, Any]:
    """Collective. Restores the engine; returns this rank's trainer state (step, rng, loader, counters).

    `expect` lists meta.json values this run must match (engine, ZeRO stage, task, frozen-weight fingerprint)."""
    meta = read_meta(path)
    if meta["world_size"] != dist.world_size:
        raise ValueError(f"checkpoint {path} was written by {meta['world_size']} ranks; this run has {dist.world_size}")
    for key, want in expect.items():
        have = meta.get(key)
        if key == "frozen_fingerprint":
            if have is not None and not np.isclose(have, want, rtol=1e-9, atol=1e-6):
                raise ValueError(f"checkpoint {path}: the frozen weights differ from this run's (other pretrained/seed?)")
        elif have != want:
            raise ValueError(f"checkpoint {path} has {key}={have!r}; this run has {want!r}")
    engine.load(path)
    state = safe_torch_load(path / f"rank-{dist.rank:05d}.pt")
    if not isinstance(state, dict) or not {"step", "rng", "loader"} <= state.keys():
        raise ValueError(f"checkpoint {path}/rank-{dist.rank:05d}.pt is not a mona-dist trainer state")
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
    return state
