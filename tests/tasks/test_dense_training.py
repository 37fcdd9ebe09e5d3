"""End to end on the synthetic real-format shards: `mona-dist train` on 2 CPU ranks (DDP) raises
the task metric well above the untrained model's, both measured by the real metric code (mmseg, pycocotools, VOC07).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def _shards(task: str, root: Path) -> Path:
    """Synthetic shards written once per test session into a temporary data/ tree (what the CLI would write)."""
    from mona_dist.data.synthetic import build

    out = root / "data" / "synthetic" / task
    if not (out / "shards" / "val.index.json").exists():
        build(task, str(out))
    return out


def _untrained_metrics(config: Path, overrides: list[str]) -> dict[str, float]:
    """The step-0 model (same seed as the trainer's) evaluated by the task on one process."""
    from mona_dist.config import load_config
    from mona_dist.distributed import DistState
    from mona_dist.tasks import TASKS

    cfg = load_config(config, overrides)
    task = TASKS.get(cfg.task)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model(cfg).eval()
    dist = DistState(0, 0, 1, 1, 0, "127.0.0.1", 0, "single")
    with torch.no_grad():
        return task.evaluate(model, task.build_loader(cfg, "val", dist), dist)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dense")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "name, task, metric, margin",
    [("ade20k", "seg", "eval/mIoU", 8.0), ("coco", "coco", "eval/bbox_AP", 3.0), ("voc", "voc", "eval/voc_mAP", 5.0)],
)
def test_two_rank_training_beats_the_untrained_model(data_root, tmp_path, name, task, metric, margin):
    shards = _shards(name, data_root) / "shards"
    overrides = [
        f"data.train_shards={shards}/train.index.json",
        f"data.val_shards={shards}/val.index.json",
        f"output_dir={tmp_path}/run",
        "monitor.progress_bar=false",
        "train.ckpt_interval=0",
        # DDP here (the SLURM tests run the configs' DeepSpeed engine): DeepSpeed's CPU start-up costs ~1 min a run.
        "engine.name=ddp",
        "engine.zero_stage=0",
    ]
    config = ROOT / "configs" / "cpu" / f"{name}.yaml"
    before = _untrained_metrics(config, overrides)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "launch" / "train.py"), "--config", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if metric in r]
    assert evals, f"no {metric} in metrics.jsonl"
    after = evals[-1]
    assert after[metric] > before[metric] + margin, (before, after)
    if task == "coco":
        assert after["eval/segm_AP"] > before["eval/segm_AP"]
