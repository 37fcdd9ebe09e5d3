"""AdamW groups (trainable only, no decay on norms/biases/1-d/gamma, lr_mult) and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
from torch import nn

from mona_dist.config.schema import OptimConfig, ScheduleConfig
from mona_dist.engine.optim import LRSchedule, lr_multiplier, param_groups
from mona_dist.models import build_backbone


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = build_backbone("swin_nano_patch4_window7", "mona")
        self.head = nn.Linear(256, 3)


def test_groups_hold_only_trainable_params_and_skip_decay_where_due():
    model = WithHead()
    groups = param_groups(model, OptimConfig(lr=1e-3, weight_decay=0.05, lr_mult={"head": 10.0}))
    names = {id(p): n for n, p in model.named_parameters()}
    in_groups = [names[id(p)] for g in groups for p in g["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(in_groups) == sorted(trainable)  # frozen weights never reach the optimizer
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.ndim <= 1 or n.endswith(("gamma", "gammax")) or "norm" in n
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
            assert g["lr_mult"] == (10.0 if n.startswith("head.") else 1.0), n
            assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"])
    assert any(names[id(p)].endswith("gammax") for g in groups if g["weight_decay"] == 0 for p in g["params"])


def test_lr_multiplier_longest_prefix_wins():
    mult = {"head": 10.0, "head.fc": 2.0}
    assert lr_multiplier("head.fc.weight", mult) == 2.0
    assert lr_multiplier("head.bias", mult) == 10.0
    assert lr_multiplier("header.weight", mult) == 1.0  # a prefix matches whole name parts only


def test_no_trainable_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), OptimConfig())


def test_schedules():
    s = LRSchedule(ScheduleConfig(kind="cosine", warmup_iters=10, warmup_start=0.0, min_lr_ratio=0.1), 1.0, 110)
    assert [s(i) for i in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5) and s(110) == pytest.approx(0.1)
    p = LRSchedule(ScheduleConfig(kind="poly", power=2.0), 2.0, 100)
    assert p(50) == pytest.approx(2.0 * 0.25)
    st = LRSchedule(ScheduleConfig(kind="step", milestones=[3, 6], gamma=0.1), 1.0, 10)
    assert [st(i) for i in (2, 3, 6)] == pytest.approx([1.0, 0.1, 0.01])
    assert math.isclose(LRSchedule(ScheduleConfig(kind="constant"), 0.3, 5)(4), 0.3)
