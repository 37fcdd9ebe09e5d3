"""Every webdataset (1.0.x) workaround lives here; the rest of the package never touches webdataset's splitters.

We use webdataset for what it does well -- opening any URL or `pipe:` command (`gopen`), walking a tar stream and
grouping members into samples (`tar_file_expander`, `group_by_keys`), the shuffle buffer -- and replace its
`WebDataset` front end, because of these pitfalls (each has a test in tests/data/test_wds_compat.py):

1. `WebDataset(resampled=True)` still applies a node splitter, so resampled multi-node runs silently drop shards
   (`split_by_node`) or raise (the default `single_node_only`).
2. Its splitters and `ResampledShards` learn rank/world size from `RANK`/`WORLD_SIZE` or torch.distributed, and
   `WebDataset` reads `WDS_SEED`/`WDS_CACHE*`. Here the trainer passes rank and world size explicitly, and nothing
   in the data layer reads the environment.
3. `with_epoch(n)` counts per worker, so an "epoch" is n x workers x ranks samples. We compute each worker's exact
   share instead (`plan.py`).
4. The default handler (`reraise_exception`) kills the run on one bad shard; `WebDataset(handler=warn_and_continue)`
   hides how many were lost. `SkipCounter` warns *and* counts, so the trainer can log it.
5. `webdataset.filters._shuffle` needs an iterator (it calls `next()` on its input), not a list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

log = logging.getLogger("mona_dist.data")


@dataclass
class SkipCounter:
    """Samples and shards dropped because they could not be read or decoded (warned once each)."""

    samples: int = 0
    shards: int = 0

    def shard_error(self, exn: BaseException) -> bool:
        """webdataset handler protocol: return True to continue with the next shard."""
        self.shards += 1
        log.warning("skipping the rest of an unreadable shard (%d so far): %s", self.shards, _short(exn))
        return True

    def sample_error(self, key: str, exn: BaseException) -> None:
        self.samples += 1
        log.warning("skipping corrupt sample %s (%d so far): %s", key, self.samples, _short(exn))


def _short(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {str(exn)[:200]}"


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process.

    Only torch's worker info, never `WORKER`/`NUM_WORKERS` env variables (pitfall 2).
    """
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def iter_shard(url: str, start: int = 0, stop: Optional[int] = None, *, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples number `start` to `stop` (exclusive) of one shard, in tar order, as webdataset dicts of bytes.

    Reading stops right after `stop`, so two workers sharing a shard each read only up to their part. A shard that
    cannot be opened or breaks mid-way is counted once and the samples read so far are kept.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    failed: list[BaseException] = []

    def on_error(exn: BaseException) -> bool:  # webdataset may report one broken tar at two levels: count it once
        if not failed:
            failed.append(exn)
            skips.shard_error(exn)
        return True

    sources = url_opener([{"url": url}], handler=on_error)
    opened: list[dict] = []

    def remember(srcs: Iterable[dict]) -> Iterator[dict]:
        for src in srcs:
            opened.append(src)
            yield src

    files = tar_file_expander(remember(sources), handler=on_error)
    samples = group_by_keys(files, handler=on_error)
    try:
        for i, sample in enumerate(samples):
            if stop is not None and i >= stop:
                break
            if i >= start:
                yield sample
    finally:
        samples.close()
        for src in opened:
            stream = src.get("stream")
            if stream is not None and hasattr(stream, "close"):
                stream.close()


def shuffled(samples: Iterator[Any], bufsize: int, seed: int) -> Iterator[Any]:
    """webdataset's shuffle buffer with an explicit seed (never time/pid-based), fed an iterator (pitfall 5)."""
    from webdataset.filters import _shuffle

    if bufsize <= 1:
        return samples
    return _shuffle(iter(samples), bufsize=bufsize, initial=bufsize, seed=seed)
