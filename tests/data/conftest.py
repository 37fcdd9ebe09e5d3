"""Small synthetic data sets in real formats, converted once per session with the user-facing writer."""

from __future__ import annotations

import pytest

# 24 train / 9 val images, 7 per shard: 4 train shards (7, 7, 7, 3) and 2 val shards (7, 2) -- uneven on purpose.
NUM_TRAIN, NUM_VAL, PER_SHARD, SIZE = 24, 9, 7, 64


@pytest.fixture(scope="session")
def synth(synthetic_set):
    """task -> output dir (with source/ and shards/), built on first use."""
    return lambda task: str(synthetic_set(task, NUM_TRAIN, NUM_VAL, SIZE, PER_SHARD))
