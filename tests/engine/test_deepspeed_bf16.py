"""DeepSpeed ZeRO-2 in bf16: the real engine, in one process, on the shipped CPU configs.

DeepSpeed casts the parameters and nothing else; the preprocessor, UperNet's BatchNorms, the losses, the detectors'
boxes and NMS and the adapter file must all come out right anyway (engine/precision.py, tasks/heads/mmdet_detector.py).
Each run starts DeepSpeed (about a minute on this machine), hence slow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from mona_dist.config import load_config
from mona_dist.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """task -> synthetic shards of about 64 px, built on first use."""
    from mona_dist.data.synthetic import build

    root, built = tmp_path_factory.mktemp("bf16-data"), {}

    def get(task: str) -> Path:
        if task not in built:
            build(task, str(root / task), num_train=32, num_val=4, size=64, per_shard=16)
            built[task] = root / task / "shards"
        return built[task]

    return get


def zero2_bf16(name: str, shards: Path, out: Path, *overrides: str):
    return load_config(ROOT / "configs" / "cpu" / f"{name}.yaml", [
        f"data.train_shards={shards}/train.index.json", f"data.val_shards={shards}/val.index.json",
        f"output_dir={out}", "data.workers=0", "monitor.progress_bar=false", "train.eval_at_end=false",
        "train.eval_interval=0", "engine.name=deepspeed", "engine.zero_stage=2", "engine.precision=bf16",
        *overrides])


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name, task, steps, lr", [("cls", "cls", 24, 2e-3), ("ade20k", "ade20k", 32, 3e-3)])
def test_zero2_bf16_trains_the_cpu_config(shards, tmp_path, name, task, steps, lr):
    cfg = zero2_bf16(name, shards(task), tmp_path / "run", f"train.max_steps={steps}", f"train.ckpt_interval={steps}",
                     "schedule.warmup_iters=2", f"optim.lr={lr}")
    assert train(cfg) == 0
    seen = losses(tmp_path / "run")
    assert len(seen) == steps and all(isinstance(x, float) and math.isfinite(x) for x in seen), seen
    k = steps // 4
    assert sum(seen[-k:]) < 0.85 * sum(seen[:k]), seen
    # the adapter file holds DeepSpeed's fp32 master weights, not the bf16 copies the forward ran on
    adapter = load_file(tmp_path / "run" / "checkpoints" / "latest" / "adapter.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in adapter.values())


class BoxOps(TorchDispatchMode):
    """Records the dtypes torchvision's NMS and RoIAlign kernels receive (below autograd: what really runs)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("torchvision::") and ("nms" in name or "roi_align" in name):
            self.calls += [(name, a.dtype) for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero2_bf16_trains_cascade_mask_rcnn_with_fp32_boxes_and_nms(shards, tmp_path):
    """Cascade Mask R-CNN (mmdet: RPN, 3 box stages with BN, masks) under DeepSpeed bf16: the backbone and FPN in
    bf16, the heads' outputs, anchors, proposals, NMS and RoIAlign (torchvision's, through mmcv's wrappers) in fp32."""
    cfg = zero2_bf16("coco", shards("coco"), tmp_path / "run", "train.max_steps=4", "train.ckpt_interval=0")
    with BoxOps() as ops:
        assert train(cfg) == 0
    seen = losses(tmp_path / "run")
    assert len(seen) == 4 and all(isinstance(x, float) and math.isfinite(x) for x in seen), seen
    names = {name for name, _ in ops.calls}
    assert {"torchvision::nms", "torchvision::roi_align"} <= names, names
    assert {dtype for _, dtype in ops.calls} == {torch.float32}
