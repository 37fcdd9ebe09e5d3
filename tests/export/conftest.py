"""Fixtures for the export tests: a short lora cls run with a checkpoint (trained in-process, single process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # train_helpers: the loop tests' run config


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory) -> Path:
    """(config path) of a finished 4-step lora run on swin_nano, checkpoints at steps 2 and 4."""
    from train_helpers import tiny_config

    from mona_dist.config import load_config
    from mona_dist.data.synthetic import build
    from mona_dist.train.loop import train

    root = tmp_path_factory.mktemp("export-run")
    build("cls", str(root / "data"), num_train=32, num_val=8, size=40, per_shard=16)
    cfg = tiny_config(root, root / "data" / "shards", model={"method": "lora", "method_options": {"rank": 4}},
                      train={"max_steps": 4, "ckpt_interval": 2, "keep_last": 2, "eval_at_end": False})
    assert train(load_config(cfg)) == 0
    return cfg
