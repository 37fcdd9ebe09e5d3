"""DeepSpeed ZeRO-1/2 bucket sizes (engine/deepspeed_engine.py `bucket_elements`): whatever a recipe trains, the
config we generate is one DeepSpeed's own ZeRO initialization accepts. An odd trainable count once gave an odd
bucket, and DeepSpeed's stage-1/2 optimizer asserts `allgather_bucket_size % 2 == 0` (issue 31: the headline
`sbatch slurm/coco_mona.sh` died before its first step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mona_dist.config import load_config
from mona_dist.config.loader import ConfigError
from mona_dist.engine.deepspeed_engine import bucket_elements, deepspeed_config, model_deepspeed_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASES = {"base.yaml", "cpu/base.yaml"}  # shared defaults without a task, not runnable on their own
RECIPES = sorted(name for name in (str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if "_base_" not in p.parts)
                 if name not in BASES)


@pytest.mark.parametrize("trainable, largest, expected", [
    # the table: trainable / largest tensor of the built COCO task models -> the old odd bucket + 1
    (61_899_442, 12_845_056, 15_474_862),  # coco_mona_swin_b (was 15,474,861)
    (63_745_458, 12_845_056, 15_936_366),  # coco_mona_swin_l (was 15,936,365)
    (60_282_546, 12_845_056, 15_070_638),  # coco_e3va_swin_l (was 15,070,637)
    (17_074_648, 3_538_944, 4_268_662),    # voc_mona_swin_l: already even, unchanged
    (44_029_484, 16_515_072, 16_515_072),  # ade20k_mona_swin_l: the largest tensor
    (1_000, 3, 1 << 20),                   # small models: DeepSpeed's floor of 2^20
    (10**10, 7, 500_000_000),              # huge models: DeepSpeed's own default, the ceiling
    (0, 2_000_001, 2_000_002),             # an odd largest tensor rounds up too
])
def test_bucket_is_a_quarter_of_what_trains_rounded_to_deepspeeds_alignment(trainable, largest, expected):
    assert bucket_elements(trainable, largest) == expected


def test_odd_bucket_settings_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"engine.bucket_elements: must be a multiple of 2 .* not 1048577"):
        load_config(CONFIGS / "cpu" / "cls.yaml", ["engine.bucket_elements=1048577"])
    cfg = load_config(CONFIGS / "cpu" / "cls.yaml", ["engine.bucket_elements=1048578"])
    assert deepspeed_config(cfg.engine, 2, 1)["zero_optimization"]["allgather_bucket_size"] == 1048578
    override = tmp_path / "ds.json"
    for key, value, rule in [("allgather_bucket_size", 5e8 + 1, "a positive multiple of 2"),
                             ("allgather_bucket_size", 2.5, "a positive multiple of 2"),
                             ("reduce_bucket_size", 0, "a positive whole number")]:
        override.write_text(json.dumps({"zero_optimization": {key: value}}))
        cfg = load_config(CONFIGS / "cpu" / "cls.yaml", [f"engine.deepspeed_config={override}"])
        with pytest.raises(ConfigError, match=rf"zero_optimization.{key} must be {rule}"):
            deepspeed_config(cfg.engine, 2, 1)
    override.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 777}}))  # DeepSpeed takes it
    cfg = load_config(CONFIGS / "cpu" / "cls.yaml", [f"engine.deepspeed_config={override}"])
    assert deepspeed_config(cfg.engine, 2, 1)["zero_optimization"]["reduce_bucket_size"] == 777
    override.write_text(json.dumps({"zero_optimization": {"allgather_bucket_size": 5e8}}))  # JSON's float 5e8
    cfg = load_config(CONFIGS / "cpu" / "cls.yaml", [f"engine.deepspeed_config={override}"])
    assert deepspeed_config(cfg.engine, 2, 1)["zero_optimization"]["allgather_bucket_size"] == 5e8


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_passes_deepspeeds_own_zero_initialization(name, one_gloo_rank):
    """The real task model (built on the meta device, then given uninitialised CPU memory: no weights, no
    training), our engine's DeepSpeed config from its trainable tensors, and DeepSpeed's initialization of the
    recipe's ZeRO optimizer on CPU, in the recipe's precision (bf16 for fp16: the CPU accelerator has no fp16)."""
    from mona_dist.engine.deepspeed_engine import DeepSpeedEngine
    from mona_dist.tasks import TASKS

    cfg = load_config(CONFIGS / name, ["model.pretrained=null"])
    if cfg.engine.precision == "fp16":
        cfg = load_config(CONFIGS / name, ["model.pretrained=null", "engine.precision=bf16"])
    assert cfg.engine.name == "deepspeed" and cfg.engine.zero_stage in (1, 2)  # what every recipe ships today
    with torch.device("meta"):
        model = TASKS.get(cfg.task).build_model(cfg)
    model = model.to_empty(device="cpu")
    ds = model_deepspeed_config(model, cfg.engine, cfg.data.batch_size, 1, torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ds["zero_optimization"]["allgather_bucket_size"] == bucket_elements(
        trainable, max(p.numel() for p in model.parameters() if p.requires_grad))
    engine = DeepSpeedEngine(model, cfg.engine, cfg.optim, torch.device("cpu"), cfg.data.batch_size, 1)
    try:
        zero = engine.ds.optimizer
        assert type(zero).__name__ == "DeepSpeedZeroOptimizer"  # stage 1/2's optimizer was built, with our buckets
        assert zero.allgather_bucket_size == zero.reduce_bucket_size == ds["zero_optimization"]["reduce_bucket_size"]
    finally:
        engine.release()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["coco", "voc"])
def test_the_benchs_deepspeed_runs_pass_deepspeeds_own_zero_initialization(task, one_gloo_rank):
    """`mona-dist bench --engine deepspeed --zero 2` builds each method's engine the way training does: the
    paper-size detectors (the bench's defaults: Swin-B Cascade Mask R-CNN, Swin-L RetinaNet), every default method."""
    from mona_dist.bench.cli import DEFAULT_METHODS
    from mona_dist.bench.runner import TASK_DEFAULTS, BenchSpec, build_model, parse_method
    from mona_dist.config.schema import EngineConfig, OptimConfig
    from mona_dist.engine.deepspeed_engine import DeepSpeedEngine

    backbone, _, classes = TASK_DEFAULTS[task]
    spec = BenchSpec(backbone=backbone, methods=DEFAULT_METHODS.split(","), task=task, batch_size=1,
                     num_classes=classes, engine="deepspeed", zero_stage=2, precision="bf16")
    odd = []
    for label in spec.methods:
        method, opts = parse_method(label)
        with torch.device("meta"):
            model = build_model(spec, method, opts)
        model = model.to_empty(device="cpu")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        odd += [label] * (trainable // 4 % 2 == 1 and trainable // 4 > 1 << 20)
        ecfg = EngineConfig(name="deepspeed", zero_stage=2, precision="bf16")
        engine = DeepSpeedEngine(model, ecfg, OptimConfig(lr=1e-5), torch.device("cpu"), 1, 1)
        try:
            assert type(engine.ds.optimizer).__name__ == "DeepSpeedZeroOptimizer"
        finally:
            engine.release()
        del model, engine
    print(f"{task}: methods whose quarter of the trainable count is odd: {odd}")
