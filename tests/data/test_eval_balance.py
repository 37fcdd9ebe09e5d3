"""Val batches per rank are equal (padding batches, never scored), so ZeRO-3 evaluation cannot hang."""

from __future__ import annotations

import os

import pytest

from mona_dist.data import build_loader, is_padding
from mona_dist.data.index import ShardSet
from mona_dist.data.plan import planned_batches, worker_plan

# The official val/test splits of the recipes (configs/_base_/*): ADE20K val, COCO val2017, VOC2007 test (detection
# and the cls recipe), Oxford Flowers-102 test, Oxford-IIIT Pets test, with each base config's eval batch/workers.
VAL_SETS = {"ade20k": (2000, 1, 4), "coco": (5000, 1, 4), "voc07": (4952, 1, 4), "flowers": (6149, 64, 4),
            "pets": (3669, 64, 4)}


def rank_batches(total: int, world: int, workers: int, batch: int, per_shard: int = 1000) -> list[int]:
    counts = [per_shard] * (total // per_shard) + ([total % per_shard] if total % per_shard else [])
    shards = ShardSet("val.index.json", [f"s{i}.tar" for i in range(len(counts))], counts, None)
    out, real = [], 0
    for rank in range(world):
        plans = [worker_plan(shards, train=False, rank=rank, world_size=world, worker=w, num_workers=workers, seed=0,
                             epoch=0, drop_last=False, batch_size=batch) for w in range(workers)]
        real += sum(s.count for p in plans for s in p.segments)
        out.append(sum(planned_batches(p, batch, False) for p in plans))
    assert real == total  # padding adds batches, never moves or drops a real sample
    return out


@pytest.mark.parametrize("name", sorted(VAL_SETS))
def test_every_world_size_up_to_32_gives_every_rank_the_same_val_batches(name):
    total, batch, workers = VAL_SETS[name]
    for world in range(1, 33):
        for w in (1, workers):
            counts = rank_batches(total, world, w, batch)
            assert len(set(counts)) == 1, (name, world, w, counts)


def test_small_val_set_where_shares_differ_by_a_batch_is_padded():
    # 9 samples, 2 ranks, batch 2, 2 workers: shares 4 and 5 -> 2 and 3 batches without padding
    total, world, workers, batch = 9, 2, 2, 2
    counts = rank_batches(total, world, workers, batch, per_shard=7)
    assert counts == [3, 3]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_padded_batches_run_but_every_sample_is_scored_once(synth, workers):
    from mona_dist.data import DataConfig

    root = synth("cls")  # 9 val samples in shards of 7 and 2
    cfg = DataConfig(train_shards=os.path.join(root, "shards", "train.index.json"),
                     val_shards=os.path.join(root, "shards", "val.index.json"), batch_size=2, eval_batch_size=2,
                     workers=workers)
    per_rank = []
    for rank in range(2):
        loader = build_loader("cls", cfg, "val", rank=rank, world_size=2, seed=0)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # rank 0's 4 samples make 2 batches (+1 padding)
    pads = [b for batches in per_rank for b in batches if is_padding(b)]
    assert len(pads) >= 1 and all(len(b["labels"]) == 1 for b in pads)
    scored = sum(len(b["labels"]) for batches in per_rank for b in batches if not is_padding(b))
    assert scored == 9
