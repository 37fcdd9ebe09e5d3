"""Run a test worker on 2 CPU ranks and read back what rank 0 wrote (the engine and FSDP test matrices)."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from ports import free_port


def spawn(worker, args: tuple, nprocs: int = 2) -> None:
    """`mp.spawn(worker, args, nprocs)`, each process ending as `mona-dist` does: it leaves its group
    (`mona_dist.distributed.finish`) unless the worker did, then ends through `mona_dist.teardown.exit_process`,
    so that no rank aborts in the interpreter's shutdown while gloo workers live."""
    mp.spawn(_run_then_exit, args=(worker, *args), nprocs=nprocs, join=True)


def _run_then_exit(rank: int, worker, *args) -> None:
    import torch.distributed as tdist

    from mona_dist.distributed import finish
    from mona_dist.teardown import exit_process

    worker(rank, *args)  # an exception goes back to mp.spawn as usual: this rank exits 1 with its traceback
    if tdist.is_initialized():
        finish()
    exit_process(0)


def spawn_variants(tmp_path_factory, worker, variants: list[dict]) -> dict:
    """Runs `worker(rank, 2, port, variants, out)` on 2 ranks; rank 0's results, keyed by variant."""
    out = tmp_path_factory.mktemp(worker.__name__) / "results.pt"
    spawn(worker, (2, free_port(), variants, str(out)))
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
