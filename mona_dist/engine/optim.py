"""AdamW parameter groups by mmcv 1.x's rules, and the learning-rate schedule by mmcv 1.x's formulas.

The official Mona runs built their optimizer with mmcv 1.x `DefaultOptimizerConstructor` and each config's
`paramwise_cfg` (mmcv 1.3.0 for ADE20K, 1.4.0 for VOC, per their logs); `param_groups` reproduces its decision for
every parameter (`ParamwiseConfig` states the rule). Only parameters with `requires_grad` reach the optimizer, so
frozen backbone weights hold no optimizer state under any engine.

Custom keys are substrings of *official* parameter names, so they are matched against names spelled that way
(`official_name`): the task model's `Backbone` stands where the official model has `backbone`, and every other
parameter keeps its name below the module that holds the backbone (the detectors' `net.neck.*` becomes mmdet's
`neck.*`, which never contains "backbone"). Inside the backbone our names differ from the official
ones only where no key looks (`trunk.`, `post_attn` for `my_module_1`, `out_norms.i` for `norm{i}`): a name
contains "norm", "relative_position_bias_table" or "absolute_pos_embed" exactly when its official counterpart does.

The schedule is a pure function of the step: the loop sets the learning rate itself before each step, which keeps
it identical across engines and makes its "state" just the step counter.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from mona_dist.config.schema import OptimConfig, ParamwiseConfig, ScheduleConfig

# mmcv's `is_norm`: the module's type decides, not its name (mmcv.utils._BatchNorm is torch's, SyncBN included).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def _backbone_path(model: nn.Module) -> Optional[str]:
    from mona_dist.models import Backbone

    paths = [name for name, m in model.named_modules() if isinstance(m, Backbone)]
    return min(paths, key=len) if paths else None


def official_name(name: str, backbone: Optional[str]) -> str:
    """`name` (a parameter's, relative to the model) as mmcv saw the official model's: see the module docstring.

    mmcv tests `key in f"{prefix}.{name}"`, so a parameter of the root module reads ".name"; the same holds here.
    """
    if backbone is None:
        return "." + name if "." not in name else name
    if backbone == "":
        return "backbone." + name
    if name.startswith(backbone + "."):
        return "backbone." + name[len(backbone) + 1:]
    parts, owner = name.split("."), backbone.split(".")
    shared = 0
    while shared < min(len(parts) - 1, len(owner) - 1) and parts[shared] == owner[shared]:
        shared += 1
    rest = ".".join(parts[shared:])
    return rest if "." in rest else "." + rest


def paramwise_mults(name: str, module: nn.Module, leaf: str, cfg: ParamwiseConfig) -> tuple[float, float]:
    """(lr multiplier, weight-decay multiplier) of one parameter, exactly as mmcv 1.x `add_params` decides.

    `name` is the official-style full name, `module` the module that owns the parameter, `leaf` its attribute name.
    """
    # mmcv sorts alphabetically, then by length, longest first: the first key contained in the name wins.
    for key in sorted(sorted(cfg.custom_keys), key=len, reverse=True):
        if key in name:
            return cfg.custom_keys[key].lr_mult, cfg.custom_keys[key].decay_mult
    is_norm = isinstance(module, NORM_TYPES)
    is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
    lr_mult = cfg.bias_lr_mult if leaf == "bias" and not is_norm else 1.0
    if is_norm:
        decay = cfg.norm_decay_mult
    elif is_dwconv:  # before the bias rule: a depthwise conv's bias takes dwconv_decay_mult (mmcv 1.x order)
        decay = cfg.dwconv_decay_mult
    elif leaf == "bias":
        decay = cfg.bias_decay_mult
    else:
        decay = 1.0
    return lr_mult, decay


def named_mults(model: nn.Module, cfg: ParamwiseConfig) -> dict[str, tuple[float, float]]:
    """Our parameter name -> (lr_mult, decay_mult) for every trainable parameter."""
    backbone = _backbone_path(model)
    out = {}
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                name = f"{module_name}.{leaf}" if module_name else leaf
                out[name] = paramwise_mults(official_name(name, backbone), module, leaf, cfg)
    return out


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split by (weight decay, lr multiplier); each group records its `lr_mult`.

    Groups keep the order of first appearance in `named_parameters`, so every engine and rank builds them alike.
    """
    mults = named_mults(model, cfg.paramwise)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():  # shared parameters appear once, as torch deduplicates them
        if name in mults:
            lr_mult, decay_mult = mults[name]
            groups.setdefault((cfg.weight_decay * decay_mult, lr_mult), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters (check model.method)")
    return [{"params": params, "weight_decay": wd, "lr_mult": mult, "lr": cfg.lr * mult}
            for (wd, mult), params in groups.items()]


def build_adamw(groups: list[dict], cfg: OptimConfig, foreach: bool = False) -> torch.optim.AdamW:
    """torch's AdamW over `groups`. `foreach` runs its multi-tensor kernels: a few launches per step instead of
    several per tensor, which is what hundreds of small adapter tensors need on a GPU (`engine.foreach`)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=foreach)


class LRSchedule:
    """lr(step) = base_lr * factor(step); `step` counts completed optimizer steps (0 for the first one), as
    mmcv's `runner.iter` in `before_train_iter`.

    `steps_per_epoch` is needed by `by_epoch` and `warmup_by_epoch` schedules (the loop passes the loader's).
    Group lr multipliers scale the whole lr, the `min_lr_ratio` floor included (mmcv keeps an absolute floor per
    group; the two agree whenever the floor is 0 or every multiplier is 1, as in every official recipe).
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, max_steps: int, steps_per_epoch: Optional[int] = None):
        if (cfg.by_epoch or cfg.warmup_by_epoch) and not steps_per_epoch:
            raise ValueError("schedule.by_epoch / schedule.warmup_by_epoch need the epoch length (shards with an index)")
        self.cfg, self.base_lr, self.max_steps, self.steps_per_epoch = cfg, base_lr, max_steps, steps_per_epoch
        self.warmup_steps = cfg.warmup_iters * (steps_per_epoch if cfg.warmup_by_epoch else 1)

    def regular(self, step: int) -> float:
        """The decayed factor without warm-up (mmcv's `get_regular_lr`)."""
        c = self.cfg
        if c.by_epoch:
            progress, span = step // self.steps_per_epoch, max(1, self.max_steps // self.steps_per_epoch)
        else:
            progress, span = step, max(1, self.max_steps)
        progress = min(progress, span)
        if c.kind == "constant":
            return 1.0
        if c.kind == "step":
            return c.gamma ** sum(progress >= m for m in c.milestones)
        r = c.min_lr_ratio
        if c.kind == "poly":
            return (1.0 - r) * (1.0 - progress / span) ** c.power + r
        return r + 0.5 * (1.0 - r) * (math.cos(math.pi * progress / span) + 1.0)

    def factor(self, step: int) -> float:
        regular = self.regular(step)
        if step >= self.warmup_steps:
            return regular
        k = (1.0 - step / self.warmup_steps) * (1.0 - self.cfg.warmup_ratio)  # mmcv's linear warm-up
        return regular * (1.0 - k)

    def __call__(self, step: int) -> float:
        return self.base_lr * self.factor(step)
