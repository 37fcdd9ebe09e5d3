"""Config loading: base inheritance, --set overrides, one-line errors for every bad-input case, resolved dump."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mona_dist.cli import main
from mona_dist.config import (Config, ConfigError, apply_overrides, deep_merge, dump_config, load_config,
                              read_yaml, validate)

REPO = Path(__file__).resolve().parents[2]
DATA = {"train_shards": "data/x/train.index.json"}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(**extra) -> dict:
    return {"task": "cls", "data": dict(DATA), **extra}


def error_of(tmp_path: Path, data: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "c.yaml", data), overrides)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("config: ")
    return msg


def test_deep_merge_merges_mappings_and_replaces_lists():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert deep_merge(base, {"a": {"y": [3]}, "c": 2}) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # not mutated


def test_base_chain_is_relative_recursive_and_child_wins(tmp_path):
    write(tmp_path / "root.yaml", {"task": "cls", "data": DATA, "optim": {"lr": 0.5, "weight_decay": 0.1},
                                   "engine": {"name": "ddp"}})
    write(tmp_path / "mid" / "mid.yaml", {"base": "../root.yaml", "optim": {"lr": 0.25}})
    leaf = write(tmp_path / "mid" / "leaf" / "leaf.yaml", {"base": "../mid.yaml", "train": {"max_steps": 7}})
    cfg = load_config(leaf)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.max_steps, cfg.engine.name) == (0.25, 0.1, 7, "ddp")


def test_set_values_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", minimal())
    cfg = load_config(path, ["train.max_steps=12", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "model.pretrained=null",
                             "engine.activation_checkpointing=true", "model.head.label_smoothing=0.1"])
    assert cfg.train.max_steps == 12 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == (0.8, 0.9) and cfg.model.pretrained is None
    assert cfg.engine.activation_checkpointing is True and cfg.model.head == {"label_smoothing": 0.1}


def test_set_without_equals_is_one_line_error():
    with pytest.raises(ConfigError, match=r"^config: --set: expected key=value, got 'train.max_steps'$"):
        apply_overrides({}, ["train.max_steps"])


@pytest.mark.parametrize(
    "data, overrides, expected",
    [
        (minimal(engine={"zero_stge": 2}), None, "config: engine.zero_stge: unknown key"),
        (minimal(), ["train.max_stepz=3"], "config: train.max_stepz: unknown key"),
        (minimal(train={"max_steps": "many"}), None, "config: train.max_steps: "),
        (minimal(engine={"precision": "fp8"}), None, "config: engine.precision: "),
        (minimal(engine={"zero_stage": 4}), None, "config: engine.zero_stage: "),
        ({"data": DATA}, None, "config: task: required key is missing"),
        (minimal(engine={"name": "fairscale", "zero_stage": 3}), None,
         "config: engine.zero_stage: ZeRO-3 is not available with the fairscale engine"),
        (minimal(engine={"name": "ddp", "zero_stage": 2}), None, "config: engine.zero_stage: ZeRO-2 needs engine.name"),
        (minimal(engine={"name": "ddp", "offload_optimizer": True}), None,
         "config: engine.offload_optimizer: offload needs engine.name=deepspeed"),
        (minimal(engine={"name": "deepspeed", "zero_stage": 2, "offload_params": True}), None,
         "config: engine.offload_params: parameter offload needs engine.zero_stage 3"),
        (minimal(engine={"name": "deepspeed", "zero_stage": 0, "offload_optimizer": True}), None,
         "config: engine.offload_optimizer: optimizer offload needs engine.zero_stage >= 1"),
        (minimal(engine={"name": "fairscale", "zero_stage": 2, "precision": "fp16"}), None,
         "config: engine.precision: fp16 is not supported with the fairscale engine"),
        (minimal(engine={"name": "deepspeed", "grad_accum": 2}, train={"nan_policy": "skip"}), None,
         "config: train.nan_policy: skip needs engine.grad_accum 1"),
        (minimal(engine={"name": "ddp", "deepspeed_config": "ds.json"}), None, "config: engine.deepspeed_config: "),
    ],
)
def test_bad_config_fails_with_one_line_naming_the_key(tmp_path, data, overrides, expected):
    assert error_of(tmp_path, data, overrides).startswith(expected)


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="config: base: inheritance cycle: a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    """A python tag would construct objects under yaml.load; safe_load refuses it."""
    path = tmp_path / "evil.yaml"
    path.write_text("task: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not (tmp_path / "pwned").exists()


def test_deepspeed_json_enabling_fp16_and_bf16_is_rejected(tmp_path):
    from mona_dist.engine.deepspeed_engine import deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"reduce_bucket_size": 1000}}))
    cfg = load_config(write(tmp_path / "c.yaml", minimal(engine={"precision": "bf16", "deepspeed_config": str(ds)})))
    with pytest.raises(ConfigError, match="^config: engine.deepspeed_config: enables both fp16 and bf16"):
        deepspeed_config(cfg.engine, micro_batch_size=2, world_size=1)
    ds.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    merged = deepspeed_config(cfg.engine, micro_batch_size=2, world_size=4)
    assert merged["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 1000}
    assert merged["gradient_clipping"] == 0.0 and merged["train_batch_size"] == 8  # clipping always explicit


def test_task_validates_its_head_options(tmp_path):
    from mona_dist.tasks import TASKS

    cls = TASKS.get("cls")
    cfg = load_config(write(tmp_path / "c.yaml", minimal(model={"num_classes": 3, "head": {"smoothing": 0.1}})))
    with pytest.raises(ConfigError, match=r"^config: model.head.smoothing: unknown key$"):
        cls.check(cfg)
    cfg = load_config(write(tmp_path / "c.yaml", minimal()))
    with pytest.raises(ConfigError, match=r"^config: model.num_classes: required for the cls task$"):
        cls.check(cfg)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml")
    dump_config(cfg, tmp_path / "config.yaml")
    assert Config.model_validate(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


@pytest.mark.parametrize("name", ["base.yaml", "cpu/base.yaml", "cpu/cls.yaml", "demo.yaml"])
def test_shipped_configs_load(name):
    """Every shipped file validates (bases get the keys only a task config supplies)."""
    data = read_yaml(REPO / "configs" / name)
    data.setdefault("task", "cls")
    data.setdefault("data", dict(DATA))
    assert validate(data).engine.name == "deepspeed"


def test_cli_prints_one_line(tmp_path, capsys):
    path = write(tmp_path / "c.yaml", minimal(engine={"name": "fairscale", "zero_stage": 3}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mona-dist train: error: config: engine.zero_stage: ZeRO-3 is not available with the fairscale "
                   "engine (its FSDP needs CUDA); use deepspeed"]
