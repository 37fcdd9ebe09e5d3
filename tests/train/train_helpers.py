"""Helpers shared by the loop tests (a uniquely named module: test folders share one import namespace)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path: Path, shards: Path, **sections) -> Path:
    """A cls run on swin_nano at 32 px, inheriting the shipped CPU config; `sections` override per key."""
    data = {
        "base": str(REPO / "configs" / "cpu" / "cls.yaml"),
        "output_dir": str(tmp_path / "run"),
        "data": {"train_shards": str(shards / "train.index.json"), "val_shards": str(shards / "val.index.json"),
                 "batch_size": 4, "eval_batch_size": 8, "workers": 0,
                 "train_pipeline": {"random_resized_crop": {"size": 32, "scale": [0.6, 1.0]}, "flip": 0.5},
                 "eval_pipeline": {"resize": {"short": 32}, "center_crop": 32}},
        "train": {"max_steps": 6, "ckpt_interval": 2, "keep_last": 2, "eval_at_end": True},
        "engine": {"name": "ddp", "zero_stage": 0},
        "monitor": {"progress_bar": False},
    }
    for key, value in sections.items():
        data.setdefault(key, {})
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
