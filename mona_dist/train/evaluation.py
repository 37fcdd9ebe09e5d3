"""Evaluation on the val shards, as the loop runs it every `train.eval_interval` and `mona-dist eval` runs it on a
checkpoint: the task's metrics, and no metric at all (rather than a 0) when no rank had a sample to score."""

from __future__ import annotations

from typing import Any, Iterator

from mona_dist.data import is_padding
from mona_dist.distributed import DistState, all_reduce_max
from mona_dist.engine import Engine
from mona_dist.tasks import Task


class EmptyValidation(ValueError):
    """The validation set yielded no sample on any rank: there is no metric (a 0 would be a lie)."""


class _Counted:
    """The loader, counting the samples it yields to be scored (padding batches aside)."""

    def __init__(self, loader: Any, task: Task):
        self.loader, self.task, self.samples = loader, task, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if not is_padding(batch):
                self.samples += self.task.batch_size(batch)
            yield batch

    def __getattr__(self, name: str) -> Any:  # shards, skipped, ... of the loader itself
        return getattr(self.loader, name)


def evaluate(task: Task, engine: Engine, loader: Any, dist: DistState) -> dict[str, float]:
    """Collective: the task's metrics on `loader`; EmptyValidation when no rank had a sample to score."""
    engine.train(False)
    counted = _Counted(loader, task)
    try:
        metrics = task.evaluate(engine, counted, dist)
    finally:
        engine.train(True)
    if all_reduce_max(counted.samples) == 0:
        skipped = getattr(loader, "skipped", 0)
        raise EmptyValidation(f"the validation set ({getattr(getattr(loader, 'shards', None), 'spec', 'val')}) "
                              f"yielded no sample to score" + (f" ({skipped} corrupt samples or unreadable shards "
                                                               f"skipped)" if skipped else ""))
    return metrics
