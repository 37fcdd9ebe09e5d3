"""The data-position rule across layouts (data/relayout.py): the interrupted epoch finishes with the steps the
uninterrupted run would have taken, no sample lost or repeated; the next epoch is split for the new layout."""

from __future__ import annotations

import os

import pytest

from mona_dist.data import resolve_shards
from mona_dist.data.loader import ShardLoader
from mona_dist.data.relayout import CarryOver, resume_stream

NUM_TRAIN = 24  # tests/data/conftest.py


def loader(spec: str, rank: int, world: int, batch: int, step_batches: int, workers: int = 0, **kw) -> ShardLoader:
    """Batches are lists of sample keys: the splitting logic without decoding."""
    out = ShardLoader(resolve_shards(spec), lambda s: s["__key__"], list, train=True, rank=rank, world_size=world,
                      seed=3, batch_size=batch, workers=workers, shuffle_buffer=4, drop_last=True, **kw)
    out.set_step_batches(step_batches)
    return out


def global_steps(loaders: list, n: int | None = None) -> list[list[str]]:
    """Each step's samples over all ranks, rank 0's micro-batches first (the order the relayout rule cuts in)."""
    iters, steps = [iter(ld) for ld in loaders], []
    accum = loaders[0].step_batches
    while n is None or len(steps) < n:
        step: list[str] = []
        for it in iters:
            for _ in range(accum):
                batch = next(it, None)
                if batch is None:  # the epoch ended (on every rank at the same step): let each loader see it
                    assert all(next(other, None) is None for other in iters if other is not it)
                    return steps
                step += batch
        steps.append(step)
    return steps


@pytest.fixture
def spec(synth):
    return os.path.join(synth("cls"), "shards", "train.index.json")


# (world, micro-batch, micro-batches per step) before and after: a global batch of 4 either way
LAYOUTS = [((2, 2, 1), (1, 2, 2)), ((1, 2, 2), (2, 2, 1)), ((2, 1, 2), (1, 4, 1)), ((1, 4, 1), (2, 1, 2))]


@pytest.mark.parametrize("old,new", LAYOUTS, ids=["2to1", "1to2", "2to1-micro4", "1to2-micro1"])
def test_interrupted_epoch_finishes_with_the_uninterrupted_steps(spec, old, new):
    (w0, b0, a0), (w1, b1, a1) = old, new
    uninterrupted = global_steps([loader(spec, r, w0, b0, a0) for r in range(w0)])
    first = [loader(spec, r, w0, b0, a0) for r in range(w0)]
    done = global_steps(first, 2)  # two steps, then a checkpoint
    states = [ld.state_dict() for ld in first]
    resumed = []
    for r in range(w1):
        ld, note = resume_stream(loader(spec, r, w1, b1, a1), states)
        assert isinstance(ld, CarryOver) and "finishing epoch 1" in note
        resumed.append(ld)
    rest = global_steps(resumed)
    assert done + rest == uninterrupted  # step by step, sample by sample, in order
    seen = [k for step in done + rest for k in step]
    assert len(seen) == len(set(seen))  # nothing twice
    # the next epoch is the new layout's own: every sample once over the ranks, as a fresh run would split it
    nxt = global_steps(resumed)
    fresh = [loader(spec, r, w1, b1, a1) for r in range(w1)]
    for f in fresh:
        f.set_epoch(1)
    assert nxt == global_steps(fresh)
    assert all(ld.state_dict()["epoch"] == 2 and "carry" not in ld.state_dict() for ld in resumed)


def test_a_checkpoint_taken_while_finishing_an_old_epoch_resumes_again(spec):
    """2 ranks -> 1 rank (mid-epoch) -> 2 ranks before that epoch ends: still the original run's steps."""
    uninterrupted = global_steps([loader(spec, r, 2, 2, 1) for r in range(2)])
    first = [loader(spec, r, 2, 2, 1) for r in range(2)]
    done = global_steps(first, 1)
    one, _ = resume_stream(loader(spec, 0, 1, 2, 2), [ld.state_dict() for ld in first])
    done += global_steps([one], 2)
    carried = [one.state_dict()]
    assert "carry" in carried[0]
    again = [resume_stream(loader(spec, r, 2, 1, 2), carried)[0] for r in range(2)]
    assert done + global_steps(again) == uninterrupted


def test_resume_at_an_epoch_boundary_splits_that_epoch_for_the_new_layout(spec):
    first = [loader(spec, r, 2, 2, 1) for r in range(2)]
    global_steps(first)  # the whole epoch 0
    ld, note = resume_stream(loader(spec, 0, 1, 2, 2), [f.state_dict() for f in first])
    assert isinstance(ld, ShardLoader) and ld.epoch == 1 and "epoch boundary" in note


def test_same_layout_resumes_each_rank_its_own_stream(spec):
    first = [loader(spec, r, 2, 2, 1) for r in range(2)]
    global_steps(first, 2)
    ld, note = resume_stream(loader(spec, 1, 2, 2, 1), [f.state_dict() for f in first])
    assert note is None and isinstance(ld, ShardLoader) and ld.position == 2


def test_other_data_or_global_batch_starts_the_next_epoch_and_says_why(spec):
    first = [loader(spec, r, 2, 2, 1) for r in range(2)]
    global_steps(first, 2)
    states = [f.state_dict() for f in first]
    other_seed = ShardLoader(resolve_shards(spec), lambda s: s["__key__"], list, train=True, rank=0, world_size=1,
                             seed=4, batch_size=2, workers=0, drop_last=True)
    ld, note = resume_stream(other_seed, states)
    assert ld.epoch == 1 and "the data changed" in note and "starting epoch 2" in note
    ld, note = resume_stream(loader(spec, 0, 1, 2, 1), states)  # 2 images per step instead of 4
    assert ld.epoch == 1 and "global batch changed (4 -> 2" in note


@pytest.mark.slow
def test_replay_runs_the_old_worker_count_in_worker_processes(spec):
    """Old rank streams with 2 workers each, replayed by one rank whose own config says workers: 0."""
    uninterrupted = global_steps([loader(spec, r, 2, 2, 1, workers=2) for r in range(2)])
    first = [loader(spec, r, 2, 2, 1, workers=2) for r in range(2)]
    done = global_steps(first, 1)
    ld, _ = resume_stream(loader(spec, 0, 1, 2, 2), [f.state_dict() for f in first])
    assert done + global_steps([ld]) == uninterrupted


def test_an_epoch_is_a_whole_number_of_steps_equal_on_every_rank(spec):
    # 24 samples, 3 ranks, no drop_last: shares of 8; batches of 3 make 3 per rank (3, 3, 2 samples)
    loaders = [ShardLoader(resolve_shards(spec), lambda s: s["__key__"], list, train=True, rank=r, world_size=3,
                           seed=0, batch_size=3, workers=0, drop_last=False) for r in range(3)]
    for ld in loaders:
        ld.set_step_batches(2)
    assert [len(ld) for ld in loaders] == [2, 2, 2]  # 3 batches -> one whole step of 2 batches
    assert [len(list(ld)) for ld in loaders] == [2, 2, 2]
    assert all(ld.epoch == 1 for ld in loaders)
