"""`mona-dist bench-data`: images/s of the full pipeline next to the raw decode rate of the same shards.

Both run through the same ShardLoader machinery (same workers, tar reading, resampled shard draws); the decode
baseline only decodes the image (and the seg label map). The two are measured in alternating rounds on live
iterators, so machine noise hits both alike; the first batch of each (worker start-up) is not timed.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from .config import PipelineConfig


def _count(batch: Any) -> int:
    if isinstance(batch, list):
        return len(batch)
    return len(batch["images"]) if isinstance(batch, dict) else int(batch)


def bench_data(shards: str, task: str, *, workers: int = 2, batches: int = 60, batch_size: int = 16,
               rounds: int = 3, pipeline: Optional[PipelineConfig] = None, seed: int = 0) -> dict[str, Any]:
    from .config import default_pipeline
    from .index import resolve_shards
    from .loader import ShardLoader
    from .pipelines import TaskPipeline, decode_only

    shard_set = resolve_shards(shards)
    pipe = TaskPipeline(task, pipeline or default_pipeline(task, "train"), True, shard_set.classes)
    common = dict(train=True, rank=0, world_size=1, seed=seed, batch_size=batch_size, workers=workers,
                  shuffle_buffer=64, resampled=True, epoch_samples=10**9, drop_last=True)
    full = iter(ShardLoader(shard_set, pipe.sample, pipe.collate, **common))
    raw = iter(ShardLoader(shard_set, decode_only(task), len, **common))
    next(full), next(raw)  # start-up, not timed
    per_round = max(1, batches // rounds)
    timings = {"pipeline": [0.0, 0], "decode": [0.0, 0]}
    for _ in range(rounds):
        for name, it in (("pipeline", full), ("decode", raw)):
            t0, images = time.perf_counter(), 0
            for _ in range(per_round):
                images += _count(next(it))
            timings[name][0] += time.perf_counter() - t0
            timings[name][1] += images
    full.close(), raw.close()  # shuts the workers down now rather than at garbage collection
    pipeline_rate = timings["pipeline"][1] / timings["pipeline"][0]
    decode_rate = timings["decode"][1] / timings["decode"][0]
    n = max(1, workers)
    return {
        "task": task,
        "shards": shards,
        "workers": workers,
        "batch_size": batch_size,
        "images": timings["pipeline"][1],
        "pipeline_images_per_s": round(pipeline_rate, 1),
        "pipeline_images_per_s_per_worker": round(pipeline_rate / n, 1),
        "decode_images_per_s": round(decode_rate, 1),
        "decode_images_per_s_per_worker": round(decode_rate / n, 1),
        "ratio": round(pipeline_rate / decode_rate, 3),
    }
