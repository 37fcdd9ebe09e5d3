"""Fixtures for eval/predict: small synthetic shards per task, and a short run whose final checkpoint they read."""

from __future__ import annotations

from pathlib import Path

import pytest


# Val images per task. cls: 4 classes make top-5 always 1.0, so top-1 alone tells models apart, and on 6 images
# it takes 7 values: a model restored wrongly (say, freshly built) could score the run's. 24 make that unlikely
# and cost under a second more. The dense tasks' metrics count pixels or boxes: 6 images give them many values.
NUM_VAL = {"cls": 24}


@pytest.fixture(scope="session")
def infer_shards(synthetic_set):
    """task ("cls" | "ade20k" | "coco" | "voc") -> its shards/ directory, built on first use."""
    return lambda task: synthetic_set(task, 16, NUM_VAL.get(task, 6), 48, 8) / "shards"


@pytest.fixture(scope="session")
def trained(tmp_path_factory, infer_shards):
    """task -> the config of a finished 3-step run on its shards (output_dir <dir>/run), trained on first use."""
    from infer_helpers import run_config

    from mona_dist.config import load_config
    from mona_dist.distributed import leave
    from mona_dist.train import train

    done: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in done:
            config = run_config(tmp_path_factory.mktemp(f"run-{task}"), task, infer_shards(task))
            assert train(load_config(config)) == 0
            leave(wait_for_peers=False)
            done[task] = config
        return done[task]

    return get
