"""Resuming a stream on another layout (world size, workers, micro-batch): the data-position rule.

A checkpoint holds each rank's loader position (loader.py: per worker, the raw samples consumed). On the same
layout every rank resumes its own stream. On another one:

  The interrupted epoch is finished in the checkpoint's layout. Every remaining optimizer step takes the images
  the interrupted run's step would have taken: its global batch of G images (old rank 0's micro-batches first,
  then old rank 1's, ...) is cut in order into the new ranks' shares of G / W' images, and each share into the new
  micro-batches. A new rank replays the old ranks' streams its shares come from, with their old worker counts;
  where several new ranks share an old stream, each reads all of it and keeps its own part. So no sample of the
  interrupted epoch is lost or seen twice, and until that epoch's end every step trains the uninterrupted run's
  images (the same loss curve up to float rounding and what depends on the rank or the micro-batch: dropout and
  drop-path draws, detection/segmentation padding to a micro-batch's largest image).
  The next epoch is split for the new layout, as a fresh run on it would split it (loader.py, plan.py).

Not replayable, so the run starts the next epoch afresh and the log says so: other data (shards, seed, resampling),
another global batch, or streams whose batch sizes are not fixed (shards without sample counts, `drop_last: false`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

from .loader import ShardLoader

_DATA_KEYS = ("resampled", "seed", "shards")


@dataclass(frozen=True)
class Layout:
    """How a run's epoch was cut: world size, workers per rank, micro-batch, micro-batches per step."""

    world_size: int
    workers: int
    batch_size: int
    step_batches: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.step_batches

    @classmethod
    def of(cls, loader: ShardLoader) -> "Layout":
        return cls(loader.world_size, loader.num_workers, loader.batch_size, loader.step_batches)


def _streams(states: list[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], Layout, dict[str, int]]:
    """Every old rank's stream state, the layout they were cut in, and the skip counters summed over ranks.

    `states` are all ranks' loader states of one checkpoint: plain `ShardLoader` states (index = old rank), or
    `CarryOver` states of a run that was itself still finishing an epoch of an older layout."""
    streams: dict[int, dict[str, Any]] = {}
    layouts, skipped = set(), {"samples": 0, "shards": 0}
    for rank, state in enumerate(states):
        for key in skipped:
            skipped[key] += int(state.get("skipped", {}).get(key, 0))
        if "carry" in state:
            carry = state["carry"]
            layouts.add(Layout(**carry["layout"]))
            streams.update({int(r): s for r, s in carry["streams"].items()})
        else:
            lay = state["layout"]
            layouts.add(Layout(lay["world_size"], lay["workers"], lay["batch_size"], int(state.get("step_batches", 1))))
            streams[rank] = state
    if len(layouts) != 1:
        raise ValueError(f"the checkpoint's ranks disagree on their data layout: {sorted(map(str, layouts))}")
    (layout,) = layouts
    if sorted(streams) != list(range(layout.world_size)):
        raise ValueError(f"the checkpoint holds data positions of ranks {sorted(streams)}, not of all "
                         f"{layout.world_size} ranks of its layout")
    return streams, layout, skipped


def resume_stream(loader: ShardLoader, states: list[dict[str, Any]]) -> tuple[Any, str | None]:
    """The loader to train from after a checkpoint with these (all ranks') loader states, and a line for the log
    (None on the same layout). `loader` is this rank's loader for the new layout, `set_step_batches` already set."""
    if len(states) == loader.world_size and "carry" not in states[loader.rank] \
            and states[loader.rank]["layout"] == loader._layout():
        loader.load_state_dict(states[loader.rank])
        return loader, None
    streams, old, skipped = _streams(states)
    new, first = Layout.of(loader), streams[0]
    epoch, mid_epoch = int(first["epoch"]), any(s["position"] for s in streams.values())
    loader._skipped_before = skipped if loader.rank == 0 else {"samples": 0, "shards": 0}
    what = f"checkpoint's data layout {old} -> {new}"
    why = None
    if {k: first["layout"][k] for k in _DATA_KEYS} != {k: loader._layout()[k] for k in _DATA_KEYS}:
        why = "the data changed (shards, seed or resampling)"
    elif not mid_epoch:
        loader.set_epoch(epoch)
        return loader, f"{what}: at an epoch boundary; epoch {epoch + 1} is split for the new layout"
    elif old.global_batch != new.global_batch:
        why = f"the global batch changed ({old.global_batch} -> {new.global_batch} images)"
    elif not loader.drop_last or (loader.shards.counts is None and not loader.resampled):
        why = "the streams' batch sizes are not fixed (data.drop_last false, or shards without sample counts)"
    if why is not None:
        loader.set_epoch(epoch + (1 if mid_epoch else 0))
        return loader, f"{what}: {why}, so the rest of epoch {epoch + 1} cannot be replayed; starting epoch " \
                       f"{loader.epoch + 1}"
    carry = CarryOver(loader, streams, old, epoch)
    return carry, (f"{what}: finishing epoch {epoch + 1} in the checkpoint's layout (this rank replays old ranks "
                   f"{sorted(carry.subs)}), then splitting the next epochs for the new one")


class CarryOver:
    """This rank's micro-batches for the rest of an epoch cut in an older layout, then its own loader's epochs.

    Quacks like a ShardLoader for the loop: iteration (one epoch per pass), `state_dict`, `skipped`, `len`."""

    def __init__(self, loader: ShardLoader, streams: dict[int, dict[str, Any]], old: Layout, epoch: int):
        self.loader, self.old, self.epoch = loader, old, epoch
        share = old.global_batch // loader.world_size
        lo, per_old = loader.rank * share, old.global_batch // old.world_size
        # (old rank, first, end) of the samples this rank takes from each old rank's block of a step
        self.parts = [(r, max(lo, r * per_old) - r * per_old, min(lo + share, (r + 1) * per_old) - r * per_old)
                      for r in range(old.world_size) if r * per_old < lo + share and lo < (r + 1) * per_old]
        self.subs: dict[int, ShardLoader] | None = {}
        # one logical worker runs the same stream in a worker process or in this one (workers: 0)
        workers = old.workers if old.workers > 1 or loader.workers > 0 else 0
        for r, _, _ in self.parts:
            sub = loader.for_layout(rank=r, world_size=old.world_size, workers=workers,
                                    batch_size=old.batch_size, records=True)
            sub.set_step_batches(old.step_batches)
            sub.load_state_dict({**streams[r], "skipped": {"samples": 0, "shards": 0}})
            self.subs[r] = sub

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def step_batches(self) -> int:
        return self.loader.step_batches

    @property
    def skip_counts(self) -> dict[str, int]:
        counts = dict(self.loader.skip_counts)
        for sub in (self.subs or {}).values():
            for key, n in sub.skip_counts.items():
                counts[key] += n
        return counts

    @property
    def skipped(self) -> int:
        return sum(self.skip_counts.values())

    def _steps(self) -> Iterator[list[Any]]:
        """This rank's share of each remaining old step, as records in the old global order."""
        assert self.subs is not None
        streams = {r: iter(sub) for r, sub in self.subs.items()}
        while True:
            share: list[Any] = []
            for r, first, end in self.parts:
                block: list[Any] = []
                for _ in range(self.old.step_batches):
                    batch = next(streams[r], None)
                    if batch is None:  # every old stream ends after the same whole number of steps (loader.py)
                        return
                    block.extend(batch)
                share.extend(block[first:end])
            yield share

    def __iter__(self) -> Iterator[Any]:
        if self.subs is None:
            yield from self.loader
            return
        size = self.loader.batch_size
        for share in self._steps():
            for i in range(0, len(share), size):
                yield self.loader.collate_fn(share[i:i + size])
        for sub in self.subs.values():  # keep what the replay skipped in the counters
            for key, n in sub.skip_counts.items():
                self.loader._skipped_before[key] += n
        self.subs = None
        self.loader.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        if self.subs is None:
            return self.loader.state_dict()
        return {"epoch": self.epoch, "skipped": self.skip_counts,
                "carry": {"layout": asdict(self.old), "streams": {str(r): s.state_dict() for r, s in self.subs.items()}}}
