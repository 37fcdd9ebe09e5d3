"""Checkpoints that survive a kill at any instant, and resume that reproduces the uninterrupted run.

    <output_dir>/checkpoints/
        step-000020/            one complete checkpoint (written as .step-000020.partial/, renamed when done)
            engine/ | engine.pt   engine state: DeepSpeed's sharded format, or torch.save for ddp/fairscale
            rank-00000.pt ...     per rank: RNG states (python, numpy, torch, this rank's GPU) and the data position
            adapter.safetensors   the trainable weights alone (`mona_dist.adapters.save_adapter`)
            buffers.pt            the model's persistent buffers (BatchNorm statistics of the heads: ddp and
                                  fairscale save trainable weights only, and eval reads the statistics)
            meta.json             written last: step, world size, engine, frozen-weight fingerprint
        latest -> step-000020   a symlink, replaced atomically (rename) only after the step directory is complete

A SIGKILL during a save leaves at most a `.partial` directory, which the next save removes; `latest` always points
at a complete checkpoint (one with meta.json). Every file is read back with weights_only=True
(mona_dist/serialization.py).

Resume (`--resume latest|auto|PATH`): `latest` that points nowhere (deleted, pruned by hand) falls back to the
newest complete checkpoint, and the log says so; a checkpoint that fails to load names the newest older complete
one. Rank 0 checks every file of the checkpoint before any rank loads (a truncated shard read by one rank alone
would leave the others waiting in a collective).

World size. meta.json records the world size that wrote the checkpoint. On the same world size each engine loads
its own format (bitwise resume on CPU). On another one, an engine that declares `reshards` loads it through
`Engine.load_resharded` (ddp and fairscale keep whole states; DeepSpeed loads the gathered trainable state saved
beside its shards); RNG states come from the rank files of the ranks that exist in both runs (new ranks reseed from
train.seed, rank and step); the data position follows `mona_dist/data/relayout.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mona_dist.adapters import save_adapter
from mona_dist.disk import DiskFull, is_disk_full, remove
from mona_dist.distributed import DistState, barrier, rank0_decides
from mona_dist.engine import Engine
from mona_dist.data.plan import mix_seed
from mona_dist.data.relayout import resume_stream
from mona_dist.serialization import safe_torch_load
from mona_dist.train.buffers import BUFFERS, load_buffers, persistent_buffers
from mona_dist.train.rng import rng_state, seed_everything, set_rng_state

FORMAT = "mona-dist-checkpoint/1"
MODEL_KEYS = ("backbone", "method", "method_options")  # meta.json's description of the model (setup.model_meta)
LATEST = "latest"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def frozen_fingerprint(model: torch.nn.Module) -> float:
    """A cheap checksum of the frozen weights: they are not saved, so a resume must rebuild exactly the same ones."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters() if not p.requires_grad and p.numel()) or 0.0)


# -- save ----------------------------------------------------------------------------------------------------------
def save_checkpoint(output_dir: str | Path, step: int, engine: Engine, loader: Any, dist: DistState,
                    meta: dict[str, Any], keep_last: int, counters: dict[str, int] | None = None,
                    adapter_meta: dict[str, str] | None = None) -> Path:
    """Collective. Writes `step-N/` completely, then points `latest` at it; a second save of the same step is a no-op.
    `adapter_meta`: what adapter.safetensors says of the model (`mona_dist.adapters.io.adapter_metadata`)."""
    root = checkpoint_root(output_dir)
    final, partial = root / step_name(step), root / f".{step_name(step)}.partial"
    # Rank 0 decides for all (as loading does): a rank that decided alone (a stale NFS lookup, a save right after
    # the checkpoint step) would skip the collectives below that the others wait in.
    if rank0_decides(dist, (final / "meta.json").is_file):
        return final
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    try:
        engine.save(partial)
        torch.save({"step": step, "rng": rng_state(), "loader": loader.state_dict(), "counters": counters or {}},
                   partial / f"rank-{dist.rank:05d}.pt")
        weights = engine.trainable_weights()  # collective; fp32 masters under DeepSpeed bf16/fp16
        if dist.is_main:
            save_adapter(weights, partial / "adapter.safetensors", **(adapter_meta or {}), step=str(step))
            torch.save({k: v.detach().to("cpu", copy=True) for k, v in persistent_buffers(engine.model).items()},
                       partial / BUFFERS)
        barrier()
        if dist.is_main:
            (partial / "meta.json").write_text(json.dumps({"format": FORMAT, "step": step,
                                                           "world_size": dist.world_size, **meta}, indent=1))
            _fsync_dir(partial)
            os.replace(partial, final)
            _point_latest(root, final.name)
    except Exception as err:
        # A failed save leaves no partial files behind (on a full disk they would keep it full); `latest` still
        # names the last complete checkpoint. Every rank that gets here removes them (peers fail in the barrier).
        full = is_disk_full(err, root)
        problem = DiskFull(final) if full else None  # the free space as the write found it
        remove(partial)
        if problem is not None:
            raise problem from err
        raise
    if dist.is_main:
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


def set_aside_newer(root: Path, step: int) -> Path | None:
    """Resuming from an older checkpoint of this run: the newer ones belong to the abandoned continuation. They go
    to `root/abandoned-<time>/` (kept, never deleted), so the resumed run's saves and pruning never meet them.
    A save cut short (`.step-N.partial`) holds nothing to keep: it is removed (it may be what filled the disk)."""
    for partial in root.glob(".step-*.partial"):
        remove(partial)
    newer = [p for p in root.glob("step-*") if _STEP_DIR.match(p.name) and int(p.name[5:]) > step]
    if not newer:
        return None
    aside = root / time.strftime("abandoned-%Y%m%d-%H%M%S")
    aside.mkdir(exist_ok=True)
    for p in newer:
        os.replace(p, aside / p.name.lstrip("."))
    return aside


# -- finding checkpoints ---------------------------------------------------------------------------------------
_STEP_DIR = re.compile(r"^step-(\d+)$")


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a complete mona-dist checkpoint (meta.json missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}/meta.json is corrupt") from None
    except OSError as err:
        raise ValueError(f"{path}/meta.json cannot be read ({err.strerror})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mona-dist checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def complete_checkpoints(root: Path) -> list[Path]:
    """The step directories under `root` whose meta.json reads, oldest first."""
    found = []
    for p in root.glob("step-*") if root.is_dir() else ():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            try:
                read_meta(p)
            except ValueError:
                continue
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def older_complete(path: Path) -> Path | None:
    """The newest complete checkpoint beside `path` with a smaller step (what to try when `path` is corrupt)."""
    m = _STEP_DIR.match(path.name)
    step = int(m.group(1)) if m else None
    older = [p for p in complete_checkpoints(path.parent) if step is None or int(p.name[5:]) < step]
    return older[-1] if older else None


# The flags that name a checkpoint: train's --resume, and eval/predict/export's --checkpoint. Per flag: the verb of
# the note when an older checkpoint is taken, and what the "none found" error adds.
_FLAGS = {"--resume": ("resuming from", "--resume auto starts fresh when there is none"),
          "--checkpoint": ("using", "output_dir of the config")}


def _from_root(root: Path, asked: str, flag: str) -> tuple[Path | None, str | None]:
    """`root/latest` if it names a complete checkpoint, else the newest complete one (and a note saying so)."""
    latest = root / LATEST
    if latest.exists():
        try:
            read_meta(latest.resolve())
            return latest.resolve(), None
        except ValueError:
            pass
    complete = complete_checkpoints(root)
    if not complete:
        return None, None
    verb = _FLAGS[flag][0]
    if latest.is_symlink() or latest.exists():
        state = "points at a missing directory" if not latest.exists() else "points at an incomplete checkpoint"
        target = os.readlink(latest) if latest.is_symlink() else "?"
        return complete[-1], (f"{flag} {asked}: {latest} {state} ({target}); "
                              f"{verb} the newest complete checkpoint {complete[-1].name}")
    return complete[-1], f"{flag} {asked}: no {latest}; {verb} the newest complete checkpoint {complete[-1].name}"


def resolve_resume(output_dir: str | Path, resume: str | None,
                   flag: str = "--resume") -> tuple[Path | None, str | None]:
    """(checkpoint to load or None, a note for the log). `latest`: must find one; `auto`: fresh when there is none;
    PATH: a step directory, a checkpoints/ directory or an output_dir (its checkpoints/). `flag` (--resume or
    --checkpoint) is the option the messages name."""
    if resume is None:
        return None, None
    if resume in ("latest", "auto"):
        root = checkpoint_root(output_dir)
        found, note = _from_root(root, resume, flag)
        if found is None and resume == "latest":
            raise FileNotFoundError(f"{flag} latest: no complete checkpoint in {root} ({_FLAGS[flag][1]})")
        return found, note
    path = Path(resume)
    if path.is_file():
        raise ValueError(f"{flag} {resume}: is a file; give a checkpoint directory (<output_dir>/checkpoints/"
                         f"step-N), a checkpoints directory or an output_dir")
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {resume}: no such checkpoint directory")
    if (path / "meta.json").exists():
        return path.resolve(), None
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_symlink() or complete_checkpoints(root):
            found, note = _from_root(root, resume, flag)
            if found is not None:
                return found, note
    raise ValueError(f"{flag} {resume}: not a checkpoint directory (no meta.json, and no complete checkpoint in it)")


def verify_files(path: Path, world_size: int) -> None:
    """Rank 0, before anyone loads: every rank file is there and every torch file passes its zip CRCs."""
    missing = [f"rank-{r:05d}.pt" for r in range(world_size) if not (path / f"rank-{r:05d}.pt").is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing[0]} (written by {world_size} ranks)")
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".pt", ".pth")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            bad = f.name
        if bad is not None:
            raise ValueError(f"checkpoint {path}: {f.relative_to(path)} is truncated or not a torch file")


def _trainer_state(path: Path, rank: int) -> dict[str, Any]:
    state = safe_torch_load(path / f"rank-{rank:05d}.pt")
    if not isinstance(state, dict) or not {"step", "rng", "loader"} <= state.keys():
        raise ValueError(f"checkpoint {path}/rank-{rank:05d}.pt is not a mona-dist trainer state")
    return state


def check_meta(path: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """`path`'s meta.json, once it has every value of `expect` (the frozen-weight fingerprint within float noise);
    else one ValueError line naming the first that differs. Of the model's description (MODEL_KEYS), backbone and
    method must match; method_options may change between runs (recomputation, say): they are named only when the
    frozen weights differ; a checkpoint older than these keys is not held to them."""
    meta = read_meta(path)
    for key, want in expect.items():
        have = meta.get(key)
        if key in MODEL_KEYS:
            if key != "method_options" and key in meta and have != want:
                raise ValueError(f"checkpoint {path} was written with model.{key}={have!r}; this run has "
                                 f"model.{key}={want!r}")
            continue
        if key == "frozen_fingerprint":
            if have is not None and not np.isclose(have, want, rtol=1e-9, atol=1e-6):
                changed = [k for k in MODEL_KEYS if k in meta and k in expect and meta[k] != expect[k]]
                if changed:
                    k = changed[0]
                    raise ValueError(f"checkpoint {path} was written with model.{k}={meta[k]!r}; this run has "
                                     f"model.{k}={expect[k]!r}")
                raise ValueError(f"checkpoint {path}: the frozen weights built from this config differ from the "
                                 f"run's (model.pretrained or train.seed changed?)")
        elif have != want:
            raise ValueError(f"checkpoint {path} has {key}={have!r}; this run has {want!r}")
    return meta


def _prepare(path: Path, expect: dict[str, Any], world_size: int, same_layout: bool) -> tuple[dict, list | None]:
    meta = _checked(path, expect)
    try:
        loaders = None if same_layout and meta["world_size"] == world_size else \
            [_trainer_state(path, r)["loader"] for r in range(meta["world_size"])]
    except ValueError as err:
        raise ValueError(_with_fallback(path, str(err))) from None
    return meta, loaders


def _with_fallback(path: Path, message: str) -> str:
    older = older_complete(path)
    return message + (f"; the newest older complete checkpoint is {older} (--resume {older})" if older else
                      "; no older complete checkpoint exists")


@dataclass
class Resumed:
    step: int
    counters: dict[str, int]
    loader: Any  # the loader to train from: the one given, or a relayout.CarryOver
    notes: list[str]


def load_checkpoint(path: Path, engine: Engine, loader: Any, dist: DistState, expect: dict[str, Any],
                    seed: int = 0) -> Resumed:
    """Collective. Restores the engine, this rank's RNG and the data position; see the module docstring.

    `expect` lists meta.json values this run must match (engine, ZeRO stage, task, frozen-weight fingerprint)."""
    same_layout = dist.rank == 0 and _own_layout_matches(path, loader)
    meta, loader_states = rank0_decides(dist, _prepare, path, expect, dist.world_size, same_layout)
    old_world = int(meta["world_size"])
    notes = _load_engine(path, engine, meta, dist)
    try:
        state = _trainer_state(path, dist.rank) if dist.rank < old_world else None
    except ValueError as err:
        raise ValueError(_with_fallback(path, str(err))) from None
    if state is not None:
        set_rng_state(state["rng"])
    else:  # a rank the checkpoint did not have: its own stream of dropout draws from here on
        seed_everything(mix_seed(seed, dist.rank, int(meta["step"]), "resumed-rank"))
    if loader_states is None:
        loader.load_state_dict(state["loader"])
    else:
        loader, note = resume_stream(loader, loader_states)
        if note:
            notes.append(note)
    counters = state.get("counters", {}) if state is not None else {}  # rank 0 (the one that logs) has a file
    barrier()
    return Resumed(int(meta["step"]), counters, loader, notes)


def _load_engine(path: Path, engine: Engine, meta: dict[str, Any], dist: DistState) -> list[str]:
    """Collective: the engine's own state (its format, resharded from another world size), then the buffers."""
    old_world, notes = int(meta["world_size"]), []
    try:
        if old_world == dist.world_size:
            engine.load(path)
        else:
            engine.load_resharded(path, old_world)
            notes.append(f"checkpoint {path.name} was written by {old_world} ranks; loaded on {dist.world_size} "
                         f"({engine.name} resharded)")
        load_buffers(path, engine.model)
    except ValueError as err:
        raise ValueError(_with_fallback(path, str(err))) from None
    return notes


def _checked(path: Path, expect: dict[str, Any]) -> dict[str, Any]:
    meta = check_meta(path, expect)
    try:
        verify_files(path, meta["world_size"])
    except ValueError as err:
        raise ValueError(_with_fallback(path, str(err))) from None
    return meta


def restore_model(path: Path, engine: Engine, dist: DistState, expect: dict[str, Any]) -> tuple[dict, list[str]]:
    """Collective. The model state of a checkpoint, as `load_checkpoint` restores it for a resume (engine state,
    buffers), without the trainer's RNG and data position: what eval and predict run. Returns (meta, notes)."""
    meta = rank0_decides(dist, _checked, path, expect)
    notes = _load_engine(path, engine, meta, dist)
    barrier()
    return meta, notes


def _own_layout_matches(path: Path, loader: Any) -> bool:
    """Rank 0: rank 0's saved stream was cut like this run's (then every rank resumes its own stream)."""
    try:
        saved = _trainer_state(path, 0)["loader"]
    except ValueError:
        return False  # _prepare reports the file
    return "carry" not in saved and saved.get("layout") == loader._layout()

