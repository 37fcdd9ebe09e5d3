"""What a config means on this world size and these shards: the per-rank batch, the run's length in steps.

A recipe states images per optimizer step (`train.global_batch`) and its length in epochs or steps; the world size
and the shard index decide the rest. Both functions return a copy of the config with the derived numbers filled in
(`data.batch_size` = micro-batch, `engine.grad_accum`, `optim.lr`, `train.max_steps`, intervals in steps), so the
code below the loop reads plain fields, and the resolved config is what the run used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mona_dist.config.loader import ConfigError
from mona_dist.config.schema import combination_errors

if TYPE_CHECKING:
    from mona_dist.config.root import Config


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # images per optimizer step, all ranks
    world_size: int
    micro_batch: int  # images per rank per forward/backward
    grad_accum: int  # micro-batches per optimizer step
    lr_scale: float  # 1.0 unless train.batch_override asked for another global batch
    recipe_batch: int | None  # train.global_batch as the config states it

    def describe(self) -> str:
        text = (f"global batch {self.global_batch} = {self.world_size} rank(s) x {self.grad_accum} micro-batch(es) "
                f"x {self.micro_batch} image(s)")
        if self.lr_scale != 1.0:
            text += (f"; train.batch_override: {self.global_batch} instead of the recipe's {self.recipe_batch} "
                     f"images per step, lr scaled linearly by {self.lr_scale:g}")
        return text


def plan_batch(global_batch: int, world_size: int, max_micro: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) for `global_batch` images per step on `world_size` ranks, micro-batches of at most
    `max_micro` images: the fewest micro-batches that split each rank's share evenly."""
    if global_batch % world_size:
        raise ConfigError("train.global_batch", f"{global_batch} images per step cannot be split evenly over "
                          f"world size {world_size}; run on a world size that divides {global_batch}, or set "
                          f"train.batch_override (lr scaled linearly)")
    share = global_batch // world_size
    accum = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= max_micro)
    return share // accum, accum


def resolve_batch(cfg: "Config", world_size: int) -> tuple["Config", BatchPlan]:
    """The config with `data.batch_size` (micro-batch), `engine.grad_accum` and `optim.lr` for this world size."""
    t = cfg.train
    if t.global_batch is None:
        micro, accum = cfg.data.batch_size, cfg.engine.grad_accum
        plan = BatchPlan(micro * accum * world_size, world_size, micro, accum, 1.0, None)
        return cfg, plan
    target = t.batch_override or t.global_batch
    micro, accum = plan_batch(target, world_size, cfg.data.batch_size)
    plan = BatchPlan(target, world_size, micro, accum, target / t.global_batch, t.global_batch)
    engine = cfg.engine.model_copy(update={"grad_accum": accum})
    errors = combination_errors(engine, t.model_copy(update={"global_batch": None}))
    if errors:
        key, reason = errors[0]
        raise ConfigError(key, f"{reason} (train.global_batch {target} on world size {world_size} needs "
                          f"grad_accum {accum})")
    resolved = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"batch_size": micro}),
        "engine": engine,
        "optim": cfg.optim.model_copy(update={"lr": cfg.optim.lr * plan.lr_scale}),
    })
    return resolved, plan


def resolve_length(cfg: "Config", batches_per_epoch: int | None) -> tuple["Config", int | None]:
    """The config with `train.max_steps` and step-counted intervals; also returns the steps per epoch.

    `batches_per_epoch` is what this rank's loader yields in one epoch (None when the shards have no index).
    """
    t, accum = cfg.train, cfg.engine.grad_accum
    steps_per_epoch = None if batches_per_epoch is None else batches_per_epoch // accum
    needs_epochs = t.epochs is not None or t.interval_unit == "epoch" or cfg.schedule.by_epoch \
        or cfg.schedule.warmup_by_epoch
    if needs_epochs and not steps_per_epoch:
        key = "train.epochs" if t.epochs is not None else ("train.interval_unit" if t.interval_unit == "epoch"
                                                            else "schedule.by_epoch")
        why = "the shards have no index with sample counts" if batches_per_epoch is None else \
            f"an epoch holds {batches_per_epoch} batch(es), fewer than one optimizer step of {accum}"
        raise ConfigError(key, f"needs the epoch length in steps, but {why}")
    update = {}
    if t.epochs is not None:
        update = {"max_steps": t.epochs * steps_per_epoch, "epochs": None}
    if t.interval_unit == "epoch":
        update.update(eval_interval=t.eval_interval * steps_per_epoch, ckpt_interval=t.ckpt_interval * steps_per_epoch,
                      interval_unit="step")
    if not update:
        return cfg, steps_per_epoch
    return cfg.model_copy(update={"train": t.model_copy(update=update)}), steps_per_epoch
