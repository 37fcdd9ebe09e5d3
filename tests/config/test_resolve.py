"""The global batch and the run's length resolve from the world size and the shard index, with one-line errors."""

from __future__ import annotations

import pytest
import yaml

from mona_dist.config import ConfigError, load_config
from mona_dist.config.resolve import plan_batch, resolve_batch, resolve_length

DATA = {"train_shards": "data/x/train.index.json"}


def cfg_of(tmp_path, **sections):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"task": "cls", "data": {**DATA, **sections.pop("data", {})}, **sections}))
    return load_config(path)


@pytest.mark.parametrize("global_batch, world, cap, expected", [
    (16, 16, 2, (1, 1)), (16, 8, 2, (2, 1)), (16, 4, 2, (2, 2)), (16, 1, 2, (2, 8)), (16, 2, 16, (8, 1)),
    (2, 2, 2, (1, 1)), (2, 1, 2, (2, 1)), (12, 2, 4, (3, 2)), (16, 4, 3, (2, 2)),
])
def test_micro_batch_and_accumulation(global_batch, world, cap, expected):
    micro, accum = plan_batch(global_batch, world, cap)
    assert (micro, accum) == expected and micro * accum * world == global_batch and micro <= cap


def test_world_size_that_cannot_split_the_batch_is_one_line(tmp_path):
    cfg = cfg_of(tmp_path, train={"global_batch": 16})
    with pytest.raises(ConfigError) as err:
        resolve_batch(cfg, 6)
    msg = str(err.value)
    assert msg.startswith("config: train.global_batch: 16 images per step cannot be split evenly over world size 6")
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="over world size 32"):
        resolve_batch(cfg, 32)


def test_override_scales_the_lr_linearly_and_says_so(tmp_path):
    cfg = cfg_of(tmp_path, optim={"lr": 1e-4}, train={"global_batch": 16, "batch_override": 32},
                 data={"batch_size": 2})
    resolved, plan = resolve_batch(cfg, 8)
    assert resolved.optim.lr == pytest.approx(2e-4) and (resolved.data.batch_size, resolved.engine.grad_accum) == (2, 2)
    assert "instead of the recipe's 16" in plan.describe() and "scaled linearly by 2" in plan.describe()
    plain, plan = resolve_batch(cfg_of(tmp_path, data={"batch_size": 3}, engine={"grad_accum": 2}), 4)
    assert plan.global_batch == 24 and plain.data.batch_size == 3  # without a recipe batch: as configured


def test_config_rules_for_the_new_keys(tmp_path):
    for data, overrides, expected in [
        ({"train": {"global_batch": 16}, "engine": {"grad_accum": 2}}, [],
         "config: engine.grad_accum: is derived from train.global_batch"),
        ({"train": {"epochs": 3, "max_steps": 5}}, [], "config: train: set train.max_steps (5) or train.epochs (3)"),
        ({"train": {"batch_override": 8}}, [], "config: train: train.batch_override needs train.global_batch"),
    ]:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"task": "cls", "data": DATA, **data}))
        with pytest.raises(ConfigError) as err:
            load_config(path, overrides)
        assert str(err.value).startswith(expected), str(err.value)
    # deepspeed with nan_policy=skip needs accumulation 1: the derived accumulation is checked too
    cfg = cfg_of(tmp_path, train={"global_batch": 16, "nan_policy": "skip"}, data={"batch_size": 2})
    with pytest.raises(ConfigError, match="^config: train.nan_policy: skip needs engine.grad_accum 1.*grad_accum 2"):
        resolve_batch(cfg, 4)


def test_length_in_epochs_and_intervals(tmp_path):
    cfg = cfg_of(tmp_path, train={"epochs": 3, "max_steps": None, "interval_unit": "epoch", "eval_interval": 1,
                                  "ckpt_interval": 2})
    resolved, spe = resolve_length(cfg, 10)
    assert spe == 10 and resolved.train.max_steps == 30
    assert (resolved.train.eval_interval, resolved.train.ckpt_interval) == (10, 20)
    with pytest.raises(ConfigError, match="^config: train.epochs: needs the epoch length in steps, but the shards"):
        resolve_length(cfg, None)
    assert resolve_length(cfg_of(tmp_path), None)[0].train.max_steps == 100  # the default length
