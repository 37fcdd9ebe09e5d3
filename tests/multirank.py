"""Run a test worker on 2 CPU ranks and read back what rank 0 wrote (the engine and FSDP test matrices)."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from ports import free_port


def spawn_variants(tmp_path_factory, worker, variants: list[dict]) -> dict:
    """Runs `worker(rank, 2, port, variants, out)` on 2 ranks; rank 0's results, keyed by variant."""
    out = tmp_path_factory.mktemp(worker.__name__) / "results.pt"
    mp.spawn(worker, args=(2, free_port(), variants, str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def step_mean_loss(engine, batch: dict) -> float:
    """One optimizer step of `engine` on this rank's `batch`; the step's loss averaged over the ranks."""
    import torch.distributed as tdist

    loss = engine(batch)["loss"]
    engine.backward(loss)
    engine.step()
    t = loss.detach().float().reshape(1)
    tdist.all_reduce(t)
    return t.item() / tdist.get_world_size()
