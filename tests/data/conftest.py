"""Small synthetic data sets in real formats, converted once per session with the user-facing writer."""

from __future__ import annotations

import pytest

from mona_dist.data import synthetic

# 24 train / 9 val images, 7 per shard: 4 train shards (7, 7, 7, 3) and 2 val shards (7, 2) -- uneven on purpose.
NUM_TRAIN, NUM_VAL, PER_SHARD, SIZE = 24, 9, 7, 64


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """task -> output dir (with source/ and shards/), built on first use."""
    root = tmp_path_factory.mktemp("synthetic")
    built: dict[str, str] = {}

    def get(task: str) -> str:
        if task not in built:
            out = str(root / task)
            synthetic.build(task, out, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, seed=0, per_shard=PER_SHARD)
            built[task] = out
        return built[task]

    return get
