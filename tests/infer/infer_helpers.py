"""Short runs for the eval/predict tests (a uniquely named module: test folders share one import namespace)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

# Per task: the shipped CPU config and the overrides that make a run of a few seconds (tiny heads, 32-48 px).
RUNS = {
    "cls": ("cls.yaml", {"data": {"train_pipeline": {"random_resized_crop": {"size": 32, "scale": [0.6, 1.0]},
                                                     "flip": 0.5},
                                  "eval_pipeline": {"resize": {"short": 32}, "center_crop": 32}}}),
    "ade20k": ("ade20k.yaml", {"data": {"train_pipeline": {"resize": {"short": 40, "max_size": 64},
                                                           "crop": {"size": [32, 32]}, "flip": 0.5},
                                        "eval_pipeline": {"resize": {"short": 32, "max_size": 64}}}}),
    "coco": ("coco.yaml", {"data": {"train_pipeline": {"resize": {"short": 40, "max_size": 64}},
                                    "eval_pipeline": {"resize": {"short": 40, "max_size": 64}}}}),
    "voc": ("voc.yaml", {"data": {"train_pipeline": {"resize": {"short": 40, "max_size": 64}},
                                  "eval_pipeline": {"resize": {"short": 40, "max_size": 64}}}}),
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_config(tmp_path: Path, task: str, shards: Path, **sections) -> Path:
    """A config file for a short run of `task` on `shards`, output_dir tmp_path/run; `sections` merge over it."""
    base, over = RUNS[task]
    data = merge({
        "base": str(REPO / "configs" / "cpu" / base),
        "output_dir": str(tmp_path / "run"),
        "data": {"train_shards": str(shards / "train.index.json"), "val_shards": str(shards / "val.index.json"),
                 "batch_size": 2, "eval_batch_size": 2, "workers": 0},
        "train": {"max_steps": 3, "ckpt_interval": 3, "keep_last": 1, "eval_at_end": True, "log_interval": 1},
        "schedule": {"warmup_iters": 1},
        "engine": {"name": "ddp", "zero_stage": 0},
        "monitor": {"progress_bar": False, "tensorboard": False},
    }, over)
    data = merge(data, sections)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def final_eval(output_dir: Path) -> dict:
    """The run's own last eval record in metrics.jsonl (eval/... keys only)."""
    recs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if any(k.startswith("eval/") for k in r)][-1]
    return {k: v for k, v in last.items() if k.startswith("eval/")}


def assert_restores_the_saved_state(config: Path) -> dict:
    """What eval and predict restore (`mona_dist.infer.restore`) is what the run saved in its last checkpoint, not
    a freshly built model: every trainable tensor equals adapter.safetensors and every persistent buffer (the
    heads' BatchNorm statistics) buffers.pt. Returns the saved buffers by name."""
    import torch
    from safetensors.torch import load_file

    from mona_dist.config import load_config
    from mona_dist.distributed import leave
    from mona_dist.infer.restore import restore
    from mona_dist.serialization import safe_torch_load
    from mona_dist.train.buffers import persistent_buffers

    ckpt = config.parent / "run" / "checkpoints" / "latest"
    weights, buffers = load_file(str(ckpt / "adapter.safetensors")), safe_torch_load(ckpt / "buffers.pt")
    try:
        engine = restore(load_config(config), "latest").engine
        restored, live = engine.trainable_weights(), persistent_buffers(engine.model)
    finally:
        leave(wait_for_peers=False)
    # (plain asserts: pytest rewrites them in test modules only, so each says what differs)
    assert weights and restored.keys() == weights.keys(), sorted(restored.keys() ^ weights.keys())
    differ = [k for k, t in weights.items() if not torch.equal(restored[k], t)]
    assert not differ, f"restored trainable tensors differ from the saved ones: {differ}"
    assert live.keys() == buffers.keys(), sorted(live.keys() ^ buffers.keys())
    differ = [k for k, t in buffers.items() if not torch.equal(live[k], t)]
    assert not differ, f"restored buffers differ from the saved ones: {differ}"
    return buffers
