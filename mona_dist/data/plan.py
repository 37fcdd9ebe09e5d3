"""Which samples each (rank, worker) reads in an epoch: a pure function of the shard counts and the seeds.

Non-resampled, counts known (an index, or local tars we counted):
  The epoch is one sequence of samples: shards in order (val) or shuffled by (seed, epoch) (train), identically on
  every rank. Rank r takes a contiguous slice, worker w a contiguous sub-slice; a worker opens only the shards its
  slice touches and stops reading a shard at the slice end. So every sample is read by exactly one worker.
  - val (and train with drop_last=False): slices cut at floor(i * T / n): every sample exactly once, ranks differ by
    at most one sample.
  - val with the batch size given: every rank also runs the same number of batches. Ranks whose share makes fewer
    batches than the largest share get padding batches (one sample each, marked `"pad": True`, never scored) on their
    first worker, and a worker whose corrupt samples shortened it pads up to its planned count. Under ZeRO-3 every
    forward all-gathers the weights, so a rank with one batch more than the others would wait alone forever.
  - train with drop_last=True: every rank gets T // world_size samples (the tail of this epoch's order is dropped)
    and each worker emits exactly floor(n_w / batch) batches -- re-reading its slice if corrupt samples made it
    short -- so all ranks take the same number of steps.
Non-resampled, counts unknown (remote shards without an index): whole shards, shard i -> global worker i mod G.
Resampled: each worker draws shards with replacement from its own (seed, epoch, rank, worker) generator and emits
  exactly its share of `epoch_samples` (split over ranks, then workers).
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from typing import Optional

from .index import ShardSet


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes (unlike hash() on str)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Segment:
    url: str
    start: int = 0
    stop: Optional[int] = None  # None: to the end of the shard
    count: Optional[int] = None  # samples in the segment, when the shard's count is known


@dataclass(frozen=True)
class WorkerPlan:
    segments: tuple[Segment, ...]  # read in this order (non-resampled)
    resample_from: tuple[str, ...]  # resampled: draw whole shards from these, forever
    target_samples: Optional[int]  # emit exactly this many samples (train); None = until the segments end
    shuffle_seed: int
    augment_seed: int
    eval_batches: Optional[int] = None  # val: emit exactly this many batches, padding batches included

    @property
    def resampled(self) -> bool:
        return bool(self.resample_from)


def _split(lo: int, hi: int, parts: int, i: int) -> tuple[int, int]:
    n = hi - lo
    return lo + i * n // parts, lo + (i + 1) * n // parts


def worker_plan(
    shards: ShardSet,
    *,
    train: bool,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    seed: int,
    epoch: int,
    drop_last: bool,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> WorkerPlan:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    seeds = dict(
        shuffle_seed=mix_seed(seed, epoch, rank, worker, num_workers, "shuffle"),
        augment_seed=mix_seed(seed, epoch, rank, worker, num_workers, "augment"),
    )
    if resampled:
        if epoch_samples is None:
            raise ValueError("resampled loading needs epoch_samples")
        lo, hi = _split(0, epoch_samples // world_size, num_workers, worker)
        return WorkerPlan((), tuple(shards.urls), hi - lo, **seeds)

    order = list(range(len(shards.urls)))
    if train:
        random.Random(mix_seed(seed, epoch, "shards")).shuffle(order)
    if shards.counts is None:
        g, groups = rank * num_workers + worker, world_size * num_workers
        segments = tuple(Segment(shards.urls[i]) for k, i in enumerate(order) if k % groups == g)
        return WorkerPlan(segments, (), None, **seeds)

    total = sum(shards.counts)
    balanced = train and drop_last
    if balanced:
        per_rank = total // world_size
        rank_lo, rank_hi = rank * per_rank, (rank + 1) * per_rank
    else:
        rank_lo, rank_hi = _split(0, total, world_size, rank)
    lo, hi = _split(rank_lo, rank_hi, num_workers, worker)

    segments, offset = [], 0
    for i in order:
        count = shards.counts[i]
        a, b = max(lo, offset), min(hi, offset + count)
        if a < b:
            stop = b - offset if b - offset < count else None
            segments.append(Segment(shards.urls[i], a - offset, stop, b - a))
        offset += count
    eval_batches = None
    if not train and batch_size is not None:
        eval_batches = -(-(hi - lo) // batch_size)
        if worker == 0:
            eval_batches += eval_pad_batches(sum(shards.counts), world_size, num_workers, batch_size)[rank]
    return WorkerPlan(tuple(segments), (), hi - lo if balanced else None, **seeds, eval_batches=eval_batches)


@functools.lru_cache(maxsize=64)
def eval_pad_batches(total: int, world_size: int, num_workers: int, batch_size: int) -> tuple[int, ...]:
    """Per rank: padding batches that bring its val batches up to the largest rank's (see the module docstring)."""
    per_rank = []
    for rank in range(world_size):
        rank_lo, rank_hi = _split(0, total, world_size, rank)
        slices = (_split(rank_lo, rank_hi, num_workers, w) for w in range(num_workers))
        per_rank.append(sum(-(-(hi - lo) // batch_size) for lo, hi in slices))
    return tuple(max(per_rank) - n for n in per_rank)


def planned_batches(plan: WorkerPlan, batch_size: int, drop_last: bool) -> Optional[int]:
    """Batches this worker will emit if no sample is corrupt (None when shard counts are unknown)."""
    if plan.eval_batches is not None:
        return plan.eval_batches
    if plan.target_samples is not None:
        n = plan.target_samples
    elif all(s.count is not None for s in plan.segments):
        n = sum(s.count for s in plan.segments)
    else:
        return None
    return n // batch_size if drop_last else -(-n // batch_size)
