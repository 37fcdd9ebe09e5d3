"""Shard writers, synthetic real-format data sets and streaming loaders (WebDataset tar shards).

    loader = build_loader("coco", cfg.data, "train", rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...
    ckpt["data"] = loader.state_dict()   # resume: loader.load_state_dict(ckpt["data"])

Batches hold uint8 pixels; the model's `DataPreprocessor` (first module of every task model) normalises them on
the device and applies the colour jitter drawn in the workers (docs/ARCHITECTURE.md, "Data batches").

Ranks are passed in, never read from the environment (`mona_dist.distributed` is the one place that does that).
"""

from __future__ import annotations

from typing import Literal

from .config import DataConfig, PipelineConfig, default_pipeline
from .index import ShardSet, resolve_shards
from .loader import ShardLoader, is_padding
from .preprocess import DataPreprocessor

TASKS = ("cls", "seg", "coco", "voc")

__all__ = ["DataConfig", "DataPreprocessor", "PipelineConfig", "ShardLoader", "ShardSet", "build_loader", "is_padding",
           "default_pipeline", "resolve_shards"]


def build_loader(task: str, cfg: DataConfig, split: Literal["train", "val"], *, rank: int, world_size: int,
                 seed: int) -> ShardLoader:
    """The loader of one split for one rank; a missing shard spec fails here with a one-line FileNotFoundError."""
    from .pipelines import TaskPipeline

    if task not in TASKS:
        raise ValueError(f"unknown data task {task!r}; valid: {', '.join(TASKS)}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    spec = cfg.train_shards if split == "train" else cfg.val_shards
    if spec is None:
        raise ValueError("data.val_shards is not set")
    train = split == "train"
    shards = resolve_shards(spec)
    if shards.counts is None:
        import logging

        logging.getLogger("mona_dist.data").warning(
            "%s: no index with sample counts; whole shards go to ranks/workers round-robin, so ranks may get "
            "unequal batch counts (write shards with `mona-dist shards` to get an index)", spec)
    pipeline = TaskPipeline(task, cfg.pipeline(task, split), train, shards.classes, cfg.reduce_zero_label)
    return ShardLoader(
        shards, pipeline.sample, pipeline.collate, train=train, rank=rank, world_size=world_size, seed=seed,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size, workers=cfg.workers,
        shuffle_buffer=cfg.shuffle_buffer if train else 0, resampled=cfg.resampled and train,
        epoch_samples=cfg.epoch_samples, drop_last=cfg.drop_last, pin_memory=cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor, equal_eval_batches=True,
    )
