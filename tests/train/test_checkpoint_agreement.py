"""A checkpoint save is decided on rank 0 for every rank (issue 25, item 7)."""

from __future__ import annotations

import datetime
import pathlib

import pytest
import torch
import torch.distributed as tdist

from multirank import spawn
from ports import free_port


def save_with_a_stale_view(rank: int, port: int, out: str) -> None:
    """Rank 1 sees step 2's `meta.json` that is not there (an NFS lookup served from a stale cache: a stand-in for
    it). Before, rank 1 returned at once and rank 0 waited at the save's next collective for its 30-s timeout."""
    from mona_dist.config.schema import EngineConfig, OptimConfig
    from mona_dist.data.index import ShardSet
    from mona_dist.data.loader import ShardLoader
    from mona_dist.distributed import DistState
    from mona_dist.engine import build_engine
    from mona_dist.train.checkpoint import save_checkpoint, step_name

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                             timeout=datetime.timedelta(seconds=30))
    if rank == 1:
        is_file = pathlib.Path.is_file
        pathlib.Path.is_file = lambda p: p.name == "meta.json" and p.parent.name == step_name(2) or is_file(p)
    dist = DistState(rank, rank, 2, 2, 0, "127.0.0.1", port, "torchrun")
    torch.manual_seed(0)
    engine = build_engine(torch.nn.Linear(4, 2), EngineConfig(name="ddp"), OptimConfig(), micro_batch_size=1,
                          world_size=2, device=torch.device("cpu"))
    loader = ShardLoader(ShardSet("none", [], [], None), lambda s: s, list, train=True, rank=rank, world_size=2,
                         seed=0, batch_size=1, workers=0)
    save_checkpoint(out, 2, engine, loader, dist, meta={"engine": "ddp"}, keep_last=2)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rank_with_a_stale_view_of_meta_json_still_saves_with_the_others(tmp_path):
    spawn(save_with_a_stale_view, (free_port(), str(tmp_path)))
    from mona_dist.train.checkpoint import step_name

    step = tmp_path / "checkpoints" / step_name(2)
    assert (step / "meta.json").is_file()
    assert sorted(p.name for p in step.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
