"""`mona-dist bench-data`: images/s of the full pipeline next to the raw decode rate of the same shards.

Both run through the same ShardLoader machinery (same workers, tar reading, resampled shard draws). The decode
baseline is the pipeline's own first step, `TaskPipeline.decode`: every member of a sample turned into arrays at
its stored size (the image; the label map for seg; the annotations, and for COCO the instance masks rasterised from
their polygons/RLE). The pipeline adds the augmentations and the collate on top, so the ratio is what those cost.
Both are measured in alternating rounds on live iterators, so machine noise hits both alike; the first batch of
each (worker start-up) is not timed.

Normalisation, photometric jitter and the resize of detection images and seg crops run on the device, in the model
(`preprocess.DataPreprocessor`), so neither rate includes them; their own rate on `device` is measured on the same
batches and reported next to the ratio.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from .config import PipelineConfig

# Fewer images or seconds than this per side and a rate is mostly start-up and scheduling noise.
MIN_TIMED_IMAGES, MIN_TIMED_S = 200, 1.0


def _count(batch: Any) -> int:
    if isinstance(batch, list):
        return len(batch)
    return len(batch["images"]) if isinstance(batch, dict) else int(batch)


def bench_data(shards: str, task: str, *, workers: int = 2, batches: int = 60, batch_size: int = 16,
               rounds: int = 3, pipeline: Optional[PipelineConfig] = None, seed: int = 0,
               device: Optional[str] = None) -> dict[str, Any]:
    from .config import default_pipeline
    from .index import resolve_shards
    from .loader import ShardLoader
    from .pipelines import TaskPipeline

    shard_set = resolve_shards(shards)
    cfg = pipeline or default_pipeline(task, "train")
    pipe = TaskPipeline(task, cfg, True, shard_set.classes)
    common = dict(train=True, rank=0, world_size=1, seed=seed, batch_size=batch_size, workers=workers,
                  shuffle_buffer=64, resampled=True, epoch_samples=10**9, drop_last=True)
    full = iter(ShardLoader(shard_set, pipe.sample, pipe.collate, **common))
    raw = iter(ShardLoader(shard_set, pipe.decode, len, **common))
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
    device_rate, dev = _device_rate(cfg, [next(full) for _ in range(3)], device)
    full.close(), raw.close()  # shuts the workers down now rather than at garbage collection
    pipeline_rate = timings["pipeline"][1] / timings["pipeline"][0]
    decode_rate = timings["decode"][1] / timings["decode"][0]
    n = max(1, workers)
    least = min(timings["pipeline"][1], timings["decode"][1])
    shortest = min(timings["pipeline"][0], timings["decode"][0])
    warning = None
    if least < MIN_TIMED_IMAGES or shortest < MIN_TIMED_S:
        warning = (f"only {least} images in {shortest:.2f} s were timed per side (want >= {MIN_TIMED_IMAGES} "
                   f"images and >= {MIN_TIMED_S:g} s): the rates below are mostly noise; raise --batches or "
                   f"--batch-size")
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
        "device": dev,
        "device_preprocess_images_per_s": round(device_rate, 1),
        "timed_s": round(shortest, 3),
        "warning": warning,
    }


def _device_rate(cfg: PipelineConfig, batches: list[dict], device: Optional[str]) -> tuple[float, str]:
    """Images/s of the model's DataPreprocessor (jitter + normalisation; detection and seg: + the resize of images
    and their boxes, masks or label maps) on `device` (default: CUDA if present)."""
    import torch

    from mona_dist.engine.base import move_batch  # as training moves them: the per-image draws stay on the host

    from .preprocess import DataPreprocessor

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pre = DataPreprocessor(cfg.mean, cfg.std).to(dev)

    def run(batch: dict) -> Any:
        if "targets" in batch:
            return pre.detection(batch)
        if "masks" in batch:
            return pre.segmentation(batch)
        return pre(batch["images"], batch.get("img_sizes"), batch.get("jitter"))

    moved = [move_batch(b, dev) for b in batches]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    run(moved[0]), sync()  # warm-up
    t0 = time.perf_counter()
    for batch in moved:
        run(batch)
    sync()
    return sum(len(b["images"]) for b in moved) / (time.perf_counter() - t0), str(dev)
