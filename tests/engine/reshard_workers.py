"""Workers for the world-size tests: train the toy, checkpoint, and continue on another world size.

One optimizer step always trains the same 32 samples: micro-batches `toy_batch(step, m)` for m = 0, 1, one per
rank on 2 ranks, both as gradient accumulation on 1 rank; so the loss curve must not depend on the world size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as tdist

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine import build_engine

from toy import init_group, toy_batch, toy_model

OPTIM = OptimConfig(lr=3e-2, weight_decay=0.01)
MICRO = 2  # micro-batches per step over all ranks


def engine_for(spec: dict, world_size: int, tmp: Path):
    spec = dict(spec)
    if spec.pop("partition_all", False):  # ZeRO-3 keeps tensors under 1e5 elements whole unless told otherwise
        path = tmp / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        spec["deepspeed_config"] = str(path)
    cfg = EngineConfig(**spec, grad_accum=MICRO // world_size)
    return build_engine(toy_model(), cfg, OPTIM, micro_batch_size=16, world_size=world_size)


def steps(engine, rank: int, world_size: int, start: int, n: int) -> list[float]:
    accum, losses = MICRO // world_size, []
    for step in range(start, start + n):
        engine.set_lr(OPTIM.lr * (0.9 ** step))
        total = 0.0
        for a in range(accum):
            with engine.accumulating(last=a == accum - 1):
                loss = engine(toy_batch(step, rank * accum + a))["loss"]
                engine.backward(loss)
            total += loss.item()
        engine.step()
        t = torch.tensor([total])
        tdist.all_reduce(t)
        losses.append(t.item() / MICRO)
    return losses


def run(rank: int, world_size: int, port: int, variants: list[dict], root: str, phase: str) -> None:
    """phase "save": 4 steps, checkpoint, 3 more; "load": load the checkpoint of the other world size, 3 steps."""
    init_group(rank, world_size, port)
    root_dir, results = Path(root), {}
    for i, spec in enumerate(variants):
        ckpt = root_dir / f"ckpt-{i}"
        if phase == "save":
            engine = engine_for(spec, world_size, root_dir)
            steps(engine, rank, world_size, 0, 4)
            if rank == 0:
                ckpt.mkdir(parents=True)
            tdist.barrier()
            engine.save(ckpt)
            tdist.barrier()
            results[i] = steps(engine, rank, world_size, 4, 3)
        else:
            engine = engine_for(spec, world_size, root_dir)
            saved_world = int((ckpt / "world_size").read_text())
            engine.load_resharded(ckpt, saved_world)
            results[i] = steps(engine, rank, world_size, 4, 3)
        if phase == "save" and rank == 0:
            (ckpt / "world_size").write_text(str(world_size))
        engine.release()
    if rank == 0:
        torch.save(results, root_dir / f"{phase}-{world_size}.pt")
