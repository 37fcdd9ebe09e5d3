"""Cascade Mask R-CNN and RetinaNet (mmdet) on 2 CPU ranks under DDP and DeepSpeed ZeRO 0-2 (ZeRO-2 with
activation checkpointing), split between the two detectors to keep the test short: finite losses, the adapters and
heads move, every frozen weight stays bit-identical."""

from __future__ import annotations

import math

import pytest
import torch

from detection_workers import run_detectors
from multirank import spawn
from ports import free_port

VARIANTS = {
    "coco": [{"name": "ddp"}, {"name": "deepspeed", "zero_stage": 2, "activation_checkpointing": True}],
    "voc": [{"name": "deepspeed", "zero_stage": 0}, {"name": "deepspeed", "zero_stage": 1}],
}
KEYS = ["coco-ddp0", "coco-deepspeed2-ac", "voc-deepspeed0", "voc-deepspeed1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("detectors") / "results.pt"
    spawn(run_detectors, (2, free_port(), VARIANTS, str(out)))
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_detector_trains_and_keeps_frozen_weights_bit_identical(results, key):
    r = results[key]
    assert all(math.isfinite(x) for x in r["losses"]), r["losses"]
    assert r["n_frozen"] > 0 and r["frozen_same"], "a frozen weight changed"
    assert r["mona_moved"], "an adapter did not move"
    assert r["moved_fraction"] > 0.9, r["moved_fraction"]
