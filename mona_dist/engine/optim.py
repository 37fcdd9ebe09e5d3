"""AdamW parameter groups and the learning-rate schedule, shared by every engine.

Only parameters with `requires_grad` reach the optimizer, so frozen backbone weights hold no optimizer state under
any engine. The schedule is a pure function of the step: the loop sets the learning rate itself before each step,
which keeps the schedule identical across engines and makes its "state" just the step counter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mona_dist.config.schema import OptimConfig, ScheduleConfig

# Mona's scaled-LayerNorm vectors act like norm affine parameters: decaying them pulls gamma/gammax to zero.
NO_DECAY_NAMES = ("gamma", "gammax")


def wants_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Matrices and conv kernels decay; biases, norm affines, 1-d vectors and Mona's gamma/gammax do not."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim > 1 and leaf not in NO_DECAY_NAMES and "norm" not in name.lower()


def lr_multiplier(name: str, lr_mult: dict[str, float]) -> float:
    """The multiplier of the longest prefix in `lr_mult` that `name` starts with (1.0 when none does)."""
    best = max((p for p in lr_mult if name == p or name.startswith(p.rstrip(".") + ".")), key=len, default=None)
    return 1.0 if best is None else float(lr_mult[best])


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split by (weight decay, lr multiplier); each group records its `lr_mult`."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (wants_weight_decay(name, param), lr_multiplier(name, cfg.lr_mult))
        groups.setdefault(key, []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters (check model.method)")
    return [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_mult": mult, "lr": cfg.lr * mult}
        for (decay, mult), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    ]


def build_adamw(groups: list[dict], cfg: OptimConfig, foreach: bool = False) -> torch.optim.AdamW:
    """torch's AdamW over `groups`. `foreach` runs its multi-tensor kernels: a few launches per step instead of
    several per tensor, which is what hundreds of small adapter tensors need on a GPU (`engine.foreach`)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=foreach)


class LRSchedule:
    """lr(step) = base_lr * factor(step); `step` counts completed optimizer steps (0 for the first one)."""

    def __init__(self, cfg: ScheduleConfig, base_lr: float, max_steps: int):
        self.cfg, self.base_lr, self.max_steps = cfg, base_lr, max_steps

    def factor(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_iters:
            return c.warmup_start + (1.0 - c.warmup_start) * step / c.warmup_iters
        if c.kind == "constant":
            return 1.0
        if c.kind == "step":
            return c.gamma ** sum(step >= m for m in c.milestones)
        span = max(1, self.max_steps - c.warmup_iters)
        progress = min(1.0, (step - c.warmup_iters) / span)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if c.kind == "cosine" else (1.0 - progress) ** c.power
        return c.min_lr_ratio + (1.0 - c.min_lr_ratio) * decay

    def __call__(self, step: int) -> float:
        return self.base_lr * self.factor(step)
