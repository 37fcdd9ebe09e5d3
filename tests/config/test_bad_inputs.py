"""Nothing in a config runs code, and every bad input of issue 14 is one line naming what was wrong."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mona_dist.adapters import load_adapter, parse_method_options
from mona_dist.config import ConfigError, load_config
from mona_dist.config.schema import EngineConfig
from mona_dist.data.cli import read_pipeline
from mona_dist.data.index import resolve_shards
from mona_dist.engine.deepspeed_engine import deepspeed_config
from mona_dist.models import build_backbone
from mona_dist.train.checkpoint import resolve_resume

DATA = {"train_shards": "/nonexistent/train.index.json"}


def config_error(tmp_path: Path, data: dict, *overrides: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"task": "cls", **data}))
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    assert "\n" not in str(info.value)
    return str(info.value)


def one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value) and str(exc.value)
    return str(exc.value)


def test_a_pipe_spec_is_refused_unless_allowed_and_never_runs_in_the_trainer(tmp_path):
    marker = tmp_path / "ran"
    spec = f"pipe:touch {marker}; cat {tmp_path}/train-000000.tar"
    msg = config_error(tmp_path, {"data": {"train_shards": spec}})
    assert "data.train_shards: a pipe: spec runs a shell command" in msg and "allow_pipe" in msg
    cfg = load_config(tmp_path / "c.yaml", ["data.allow_pipe=true"])
    assert cfg.data.allow_pipe
    shards = resolve_shards(spec)  # an index is not looked for: that would run the command here
    assert shards.counts is None and not marker.exists()


def test_deepspeed_config_accepts_only_listed_keys(tmp_path):
    def with_override(override: dict) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(override))
        return deepspeed_config(EngineConfig(name="deepspeed", zero_stage=2, deepspeed_config=str(path)), 4, 1)

    assert with_override({"zero_optimization": {"reduce_bucket_size": 1000}})["zero_optimization"][
        "reduce_bucket_size"] == 1000
    for bad, said in [({"optimizer": {"type": "Adam"}}, "optimizer is not accepted"),
                      ({"zero_optimization": {"stage": 3}}, "set engine.zero_stage instead"),
                      ({"torch_autocast": {"enabled": True}}, "torch_autocast is not accepted"),
                      ({"fp16": {"enabled": [1]}}, "must be a number, a bool or a string")]:
        with pytest.raises(ConfigError, match=said) as info:
            with_override(bad)
        one_line(info)


@pytest.mark.parametrize("option, said", [("rank=abc", "model.method_options.rank: "),
                                          ("rank=0", "model.method_options.rank: .*greater than 0")])
def test_method_options_are_typed_and_bounded(tmp_path, option, said):
    msg = config_error(tmp_path, {"data": DATA, "model": {"method": "lora"}}, f"model.method_options.{option}")
    assert re.search(said, msg), msg


def test_yaml_errors_in_options_and_pipelines_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="method option rank: .* is not valid YAML") as info:
        parse_method_options(["rank=[1"])
    one_line(info)
    bad = tmp_path / "p.yaml"
    bad.write_text("flip: [0.5\n")
    with pytest.raises(ValueError, match=r"--pipeline .*p.yaml: not valid YAML \(line") as info:
        read_pipeline(str(bad))
    one_line(info)


def test_a_corrupt_tar_in_an_unindexed_glob_is_one_line(tmp_path):
    good = tmp_path / "train-0.tar"
    with tarfile.open(good, "w") as tar:
        data = b"x" * 10
        info = tarfile.TarInfo("000.cls")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "train-1.tar").write_bytes(b"\x00garbage" * 200 + b"more")
    with pytest.raises(ValueError, match=r"train-1.tar is not a readable tar file") as info:
        resolve_shards(str(tmp_path / "train-*.tar"))
    one_line(info)


def test_a_text_file_as_pretrained_and_a_file_as_resume_are_one_line(tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="model.pretrained: .*weights.pth is not a readable checkpoint") as info:
        build_backbone("vit_nano_patch16", "full", pretrained=str(text))
    assert "101" not in one_line(info)
    with pytest.raises(ValueError, match="is a file; give a checkpoint directory") as info:
        resolve_resume(tmp_path, str(text))
    one_line(info)


@pytest.mark.parametrize("bad, said", [(torch.ones(2, dtype=torch.int8), "is int8, not a floating-point weight"),
                                       (torch.tensor([1.0, float("nan")]), "holds 1 non-finite value")])
def test_adapter_files_are_checked_for_dtype_and_finiteness(tmp_path, bad, said):
    model = build_backbone("vit_nano_patch16", "lora")
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    path = tmp_path / "a.safetensors"
    save_file({name: bad}, str(path))
    with pytest.raises(ValueError, match=said) as info:
        load_adapter(model, path)
    one_line(info)


@pytest.mark.parametrize("argv, said", [
    (["params", "--backbone", "swin_nano_patch4_window7", "--method", "lora", "--option", "rank=0"],
     "rank: .*greater than 0"),
    (["params", "--backbone", "swin_nano_patch4_window7", "--method", "lora", "--option", "rank=abc"], "rank: "),
    (["params", "--backbone", "swin_nano_patch4_window7", "--method", "lora", "--option", "rank=[1"], "rank"),
    (["bench", "--backbone", "swin_nano_patch4_window7", "--methods", "full,lora:rank=abc", "--steps", "1"],
     "rank: "),
    (["bench", "--backbone", "swin_nano_patch4_window7", "--methods", "mona:inner_dim=-1", "--steps", "1"],
     "inner_dim: .*greater than 0"),
    (["bench", "--task", "coco", "--objects", "0", "--steps", "1"], "--objects: expected at least 1"),
], ids=["params-bound", "params-type", "params-yaml", "bench-type", "bench-bound", "bench-objects"])
def test_method_options_on_the_command_line_are_one_line(argv, said, capsys):
    from mona_dist.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"mona-dist {argv[0]}: error: ") and re.search(said, err), err
