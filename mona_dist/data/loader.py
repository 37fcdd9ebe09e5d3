"""`ShardLoader`: an epoch-aware, resumable, rank-explicit iterator over batches of a shard set.

How resume works. Each worker's raw stream (shard order, shuffle buffer, resampling) is a pure function of
(seed, epoch, rank, worker), and each sample's augmentation is seeded by its position in that stream. Workers batch
themselves and send every batch with (logical worker, raw samples consumed so far). The loader records, per logical
worker, the raw position of the last batch it *yielded*, plus which worker comes next in torch's round-robin.
`load_state_dict` re-creates the stream: worker w skips its first `raw[w]` raw samples without decoding them, and
workers are rotated so the round-robin starts at the next worker. The remaining batches are then identical, in
order and content, to an uninterrupted run (tests/data/test_loader.py checks this). On another layout (world
size, workers, micro-batch) `data/relayout.py` finishes the interrupted epoch from these states.

Signals. SLURM, torchrun and the deepspeed launcher signal a job's whole process group, workers included. torch's
worker handler exits on a SIGTERM from anyone but the worker's parent (and SIGUSR1's default action ends a
process), so a group signal used to kill the workers before the trainer could save. Workers ignore both: the
trainer saves at the next step boundary and exits; the workers end with it (torch's watchdog, and on Linux the
kernel's parent-death signal).
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from .index import ShardSet
from .plan import WorkerPlan, mix_seed, planned_batches, worker_plan
from .transfer import BlockLedger, BlockPool, pack, unpack
from .wds_compat import SkipCounter, iter_shard, shuffled, worker_info

log = logging.getLogger("mona_dist.data")


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to rebuild its part of an epoch (picklable, no open files)."""

    shards: ShardSet
    train: bool
    rank: int
    world_size: int
    num_workers: int
    seed: int
    epoch: int
    batch_size: int
    drop_last: bool
    shuffle_buffer: int
    resampled: bool
    epoch_samples: Optional[int]
    equal_eval_batches: bool = False  # val: pad every rank to the same batch count (plan.py)
    rotation: int = 0  # physical worker i plays logical worker (i + rotation) % num_workers
    resume: tuple[tuple[int, int], ...] = ()  # per logical worker: (raw consumed, emitted) so far
    records: bool = False  # send each batch's records uncollated (relayout.py regroups them)

    def plan(self, worker: int) -> WorkerPlan:
        return worker_plan(
            self.shards, train=self.train, rank=self.rank, world_size=self.world_size, worker=worker,
            num_workers=self.num_workers, seed=self.seed, epoch=self.epoch, drop_last=self.drop_last,
            resampled=self.resampled, epoch_samples=self.epoch_samples,
            batch_size=self.batch_size if self.equal_eval_batches else None,
        )


def _raw_stream(plan: WorkerPlan, skips: SkipCounter, shuffle_buffer: int) -> Iterator[dict[str, Any]]:
    """The worker's undecoded samples, shuffled through the buffer (shuffle_buffer <= 1: in order)."""
    if plan.resampled:
        import random

        def draws() -> Iterator[dict[str, Any]]:
            rng, empty_draws = random.Random(mix_seed(plan.shuffle_seed, "resample")), 0
            while empty_draws < 3 * len(plan.resample_from):  # every shard unreadable: stop, don't spin
                got = 0
                for sample in iter_shard(rng.choice(plan.resample_from), skips=skips):
                    got += 1
                    yield sample
                empty_draws = 0 if got else empty_draws + 1

        yield from shuffled(draws(), shuffle_buffer, plan.shuffle_seed)
        return

    def one_pass() -> Iterator[dict[str, Any]]:
        for seg in plan.segments:
            yield from iter_shard(seg.url, seg.start, seg.stop, skips=skips)

    # A balanced train worker re-reads its slice only if corrupt samples left it short; each pass is shuffled on
    # its own, so a second pass never mixes into (and displaces samples of) the first.
    for n in range(1 if plan.target_samples is None else 1 << 30):
        got = 0
        for sample in shuffled(one_pass(), shuffle_buffer, mix_seed(plan.shuffle_seed, n)):
            got += 1
            yield sample
        if got == 0:
            return


class _WorkerStream(IterableDataset):
    """Runs inside each DataLoader worker: yields (meta, batch) and finally (meta, None) carrying the counters.

    meta = (logical worker, raw samples consumed, samples emitted, corrupt samples skipped, shard errors).
    """

    def __init__(self, spec: StreamSpec, sample_fn: Callable, collate_fn: Callable,
                 block_flags: Optional[torch.Tensor] = None):
        super().__init__()
        self.spec, self.sample_fn, self.collate_fn = spec, sample_fn, collate_fn
        self.block_flags = block_flags  # shared with the trainer's BlockLedger (transfer.py)

    def __iter__(self):
        spec = self.spec
        physical, _ = worker_info()
        worker = (physical + spec.rotation) % spec.num_workers
        plan = spec.plan(worker)
        skips = SkipCounter()
        stream = _raw_stream(plan, skips, spec.shuffle_buffer if spec.train else 0)
        raw, emitted = spec.resume[worker] if spec.resume else (0, 0)
        for _ in range(raw):  # resume: fast-forward through what was consumed, without decoding
            if next(stream, None) is None:
                break
        target = plan.target_samples
        if target is not None and spec.drop_last:
            target -= target % spec.batch_size
        in_main = torch.utils.data.get_worker_info() is None
        pool = None if in_main or self.block_flags is None else BlockPool(self.block_flags, physical)
        buffer: list = []
        batches, first = 0, None  # batches sent; the first decoded record (what padding batches repeat)

        def meta():
            return (worker, raw, emitted, skips.samples, skips.shards)

        for sample in stream:
            if target is not None and emitted >= target:
                break
            raw += 1
            state = torch.get_rng_state() if in_main else None  # don't disturb the trainer's RNG
            # augmentation = f(stream position). The CPU generator only: `torch.manual_seed` would also reseed every
            # CUDA generator of the trainer (workers=0), making its dropout masks a function of the sample position.
            torch.default_generator.manual_seed(mix_seed(plan.augment_seed, raw))
            try:
                buffer.append(self.sample_fn(sample))
            except Exception as exn:  # noqa: BLE001 -- an undecodable sample is skipped, never fatal
                skips.sample_error(f"{sample.get('__url__')}:{sample.get('__key__')}", exn)
                continue
            finally:
                if state is not None:
                    torch.set_rng_state(state)
            emitted += 1
            first = buffer[-1] if first is None else first
            if len(buffer) == spec.batch_size:
                yield meta(), self._batch(buffer, in_main, pool)
                batches, buffer = batches + 1, []
        if buffer and not spec.drop_last:
            yield meta(), self._batch(buffer, in_main, pool)
            batches += 1
        while plan.eval_batches is not None and batches < plan.eval_batches:  # equal batch counts: plan.py
            first = first if first is not None else self._pad_record()
            yield meta(), self._batch([first], in_main, pool, pad=True)
            batches += 1
        yield meta(), None

    def _batch(self, records: list, in_main: bool, pool: Optional[BlockPool], pad: bool = False) -> Any:
        if self.spec.records:
            return list(records)
        batch = self.collate_fn(records)
        if pad:
            batch["pad"] = True  # run through the model like any batch, never scored (`is_padding`)
        return batch if in_main else pack(batch, pool)  # one shared block per batch: see transfer.py

    def _pad_record(self) -> Any:
        """The first decodable sample of the whole split, for a worker that has none of its own to repeat."""
        for url in self.spec.shards.urls:
            for sample in iter_shard(url, skips=SkipCounter()):
                try:
                    return self.sample_fn(sample)
                except Exception:  # noqa: BLE001 -- corrupt: try the next one
                    continue
        raise ValueError(f"no decodable sample in {len(self.spec.shards.urls)} val shards to pad ranks' batch counts")


def is_padding(batch: Any) -> bool:
    """True for the padding batches that equalise val batch counts across ranks: evaluate them, never score them."""
    return isinstance(batch, dict) and bool(batch.get("pad", False))


def _identity(x):
    return x


def _worker_init(_: int) -> None:
    """In each DataLoader worker: outlive a group SIGTERM/SIGUSR1 (see the module docstring), die with the trainer."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:  # PR_SET_PDEATHSIG = 1: SIGKILL us when the trainer (our parent) dies, even by SIGKILL
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # torch's watchdog still ends the worker within seconds of its parent


class ShardLoader:
    """Iterable over batches of one split for one rank. Construct with `mona_dist.data.build_loader`.

    - `set_epoch(e)` picks the epoch (shard order, shuffles, augmentation); finishing an epoch moves to the next.
      Setting the epoch it is already in keeps the position, so `load_state_dict` then `set_epoch` resumes.
    - Iterating again after a `break` continues with the next unseen batch.
    - `skipped` counts corrupt samples + unreadable shards so far (`skip_counts` splits them).
    - `len(loader)`: batches per epoch for this rank (exact for training; eval: before corrupt samples).
    - `set_step_batches(n)`: the trainer's micro-batches per optimizer step; an epoch then ends after a whole
      number of steps, the same on every rank (at most n - 1 batches of the epoch's end are dropped, as
      `drop_last` drops a partial batch), so epochs and steps stay aligned and ranks never disagree on them.
    """

    def __init__(self, shards: ShardSet, sample_fn: Callable, collate_fn: Callable, *, train: bool, rank: int,
                 world_size: int, seed: int, batch_size: int, workers: int, shuffle_buffer: int = 0,
                 resampled: bool = False, epoch_samples: Optional[int] = None, drop_last: bool = False,
                 pin_memory: bool = False, prefetch_factor: int = 2, equal_eval_batches: bool = False,
                 records: bool = False):
        self.shards, self.sample_fn, self.collate_fn = shards, sample_fn, collate_fn
        self.records = records  # yield lists of uncollated records (relayout.py)
        self.step_batches = 1
        self.train, self.rank, self.world_size, self.seed = train, rank, world_size, seed
        self.batch_size, self.workers = batch_size, workers
        self.shuffle_buffer, self.resampled, self.epoch_samples = shuffle_buffer, resampled, epoch_samples
        self.drop_last = drop_last and train
        # val: every rank runs the same number of batches, padding ones (dict batches with "pad": True) included
        self.equal_eval_batches = equal_eval_batches and not train
        self.pin_memory, self.prefetch_factor = pin_memory and torch.cuda.is_available(), prefetch_factor
        self.epoch = 0
        self._skipped_before = {"samples": 0, "shards": 0}
        self._skips_now: dict[int, tuple[int, int]] = {}
        self._reset_position()

    @property
    def num_workers(self) -> int:
        return max(1, self.workers)

    def _reset_position(self) -> None:
        self.position = 0  # batches yielded in this epoch
        self._resume = [(0, 0)] * self.num_workers  # per logical worker: (raw consumed, emitted)
        self._next_worker = 0

    def _fold_skips(self) -> None:
        for s, sh in self._skips_now.values():
            self._skipped_before["samples"] += s
            self._skipped_before["shards"] += sh
        self._skips_now = {}

    @property
    def skip_counts(self) -> dict[str, int]:
        now = self._skips_now.values()
        return {"samples": self._skipped_before["samples"] + sum(s for s, _ in now),
                "shards": self._skipped_before["shards"] + sum(sh for _, sh in now)}

    @property
    def skipped(self) -> int:
        return sum(self.skip_counts.values())

    def for_layout(self, *, rank: int, world_size: int, workers: int, batch_size: int, records: bool) -> "ShardLoader":
        """The same data and seed on another layout: another rank's stream, as `relayout.py` replays it."""
        other = ShardLoader(self.shards, self.sample_fn, self.collate_fn, train=self.train, rank=rank,
                            world_size=world_size, seed=self.seed, batch_size=batch_size, workers=workers,
                            shuffle_buffer=self.shuffle_buffer, resampled=self.resampled,
                            epoch_samples=self.epoch_samples, drop_last=self.drop_last,
                            pin_memory=self.pin_memory and not records, prefetch_factor=self.prefetch_factor,
                            equal_eval_batches=self.equal_eval_batches, records=records)
        other.step_batches = self.step_batches
        return other

    def set_step_batches(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"batches per step must be >= 1, got {n}")
        self.step_batches = n

    def _planned(self, rank: int) -> Optional[int]:
        """Batches `rank` would yield this epoch without the step rounding (None: counts unknown)."""
        spec = replace(self._spec(), rank=rank)
        counts = [planned_batches(spec.plan(w), self.batch_size, self.drop_last) for w in range(self.num_workers)]
        return None if any(c is None for c in counts) else sum(counts)

    def epoch_batches(self) -> Optional[int]:
        """Batches per epoch for this rank: whole steps, the same number on every rank (None: counts unknown)."""
        mine = self._planned(self.rank)
        if mine is None or not self.train:
            return mine
        # Balanced (drop_last) and resampled epochs give every rank the same count by construction.
        equal = self.resampled or self.drop_last or self.world_size == 1
        fewest = mine if equal else min(self._planned(r) for r in range(self.world_size))
        return fewest - fewest % self.step_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_position()

    def _spec(self) -> StreamSpec:
        return StreamSpec(
            self.shards, self.train, self.rank, self.world_size, self.num_workers, self.seed, self.epoch,
            self.batch_size, self.drop_last, self.shuffle_buffer, self.resampled, self.epoch_samples,
            self.equal_eval_batches, rotation=self._next_worker, resume=tuple(self._resume), records=self.records,
        )

    def __len__(self) -> int:
        n = self.epoch_batches()
        if n is None:
            raise TypeError("epoch length unknown: these shards have no index with sample counts")
        return n

    def __iter__(self) -> Iterator[Any]:
        self._fold_skips()
        # blocks per worker: the batches prefetched, the one being received, the one the caller's loop variable
        # still holds and the one before it (handed back at the next receive); see transfer.py
        ledger = BlockLedger(self.num_workers, self.prefetch_factor + 3) if self.workers > 0 and not self.records \
            else None
        limit = self.epoch_batches() if self.train else None  # whole steps, equal on every rank
        stream = _WorkerStream(self._spec(), self.sample_fn, self.collate_fn, ledger and ledger.flags)
        extra = {"prefetch_factor": self.prefetch_factor, "worker_init_fn": _worker_init} if self.workers > 0 else {}
        # Our own generator: without one, every new DataLoader iterator draws its base seed from the *global* torch
        # RNG, so the trainer's random stream (dropout, drop-path) would depend on when loaders are (re)created, and a
        # resumed run would no longer match an uninterrupted one. Worker streams are seeded by the plan, not by this.
        loader = DataLoader(stream, batch_size=None, num_workers=self.workers, collate_fn=_identity,
                            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0), **extra)
        for (worker, raw, emitted, skip_samples, skip_shards), batch in loader if limit != self.position else ():
            self._skips_now[worker] = (skip_samples, skip_shards)
            if batch is None:
                continue
            self._resume[worker] = (raw, emitted)
            self._next_worker = (worker + 1) % self.num_workers
            self.position += 1
            if ledger is not None:
                ledger.receive(batch)
            yield batch if self.records else unpack(batch)
            if self.position == limit:
                break  # the epoch ends on a step boundary (set_step_batches)
        self._fold_skips()
        self.epoch += 1
        self._reset_position()

    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "workers": self.num_workers, "batch_size": self.batch_size,
                "resampled": self.resampled, "seed": self.seed, "shards": len(self.shards.urls)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "resume": [list(r) for r in self._resume],
                "next_worker": self._next_worker, "layout": self._layout(), "skipped": self.skip_counts,
                "step_batches": self.step_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._reset_position()
        self._skipped_before, self._skips_now = dict(state.get("skipped", self._skipped_before)), {}
        if state["layout"] != self._layout():
            if state["position"]:
                log.warning("data layout changed since the checkpoint (%s -> %s): starting epoch %d afresh",
                            state["layout"], self._layout(), self.epoch + 1)
                self.epoch += 1
            return
        self.position = int(state["position"])
        self._resume = [tuple(r) for r in state["resume"]]
        self._next_worker = int(state["next_worker"])
