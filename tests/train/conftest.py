"""Fixtures for the loop tests: tiny synthetic classification shards (run configs: train_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def cls_shards(tmp_path_factory) -> Path:
    """64 train / 16 val images (4 shape classes) as real WebDataset shards with index files."""
    from mona_dist.data.synthetic import build

    out = tmp_path_factory.mktemp("cls-data")
    build("cls", str(out), num_train=64, num_val=16, size=40, per_shard=16)
    return out / "shards"
