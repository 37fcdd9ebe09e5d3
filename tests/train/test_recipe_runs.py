"""A recipe-style run through the real loop: images per step from train.global_batch (accumulation derived),
length in epochs from the shard index, epoch-counted evaluation, an epoch-stepped lr; the log states the plan."""

from __future__ import annotations

import json
import math

import pytest

from train_helpers import REPO, tiny_config
from mona_dist.config import load_config
from mona_dist.train import train


def test_global_batch_and_epochs_drive_the_run(tmp_path, cls_shards, capsys):
    # 64 training images, 16 per step on one rank with micro-batches of at most 4: 4 micro-batches, 4 steps/epoch.
    path = tiny_config(tmp_path, cls_shards,
                       train={"max_steps": None, "epochs": 2, "global_batch": 16, "interval_unit": "epoch",
                              "eval_interval": 1, "ckpt_interval": 1, "eval_at_end": False, "log_interval": 1},
                       schedule={"kind": "step", "by_epoch": True, "milestones": [1], "gamma": 0.5,
                                 "warmup_iters": 0},
                       optim={"lr": 1e-3})
    assert train(load_config(path)) == 0
    out = tmp_path / "run"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # 2 epochs x 4 steps
    assert [r["lr"] for r in steps] == [1e-3] * 4 + [5e-4] * 4  # the lr changes at the epoch boundary
    assert [r["step"] for r in recs if any(k.startswith("eval/") for k in r)] == [4, 8]  # every epoch
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "latest") == \
        ["step-000004", "step-000008"]
    logged = capsys.readouterr()
    assert "global batch 16 = 1 rank(s) x 4 micro-batch(es) x 4 image(s); 8 steps (4 per epoch)" in logged.out + logged.err


CONFIGS = REPO / "configs"
# 64 px for the detectors: their smallest anchors (32 px on P2) must fit inside the image (mmdet's allowed_border 0)
_BOXES = {"train_pipeline": {"resize": {"short": 64, "max_size": 96}, "flip": 0.5},
          "eval_pipeline": {"resize": {"short": 64, "max_size": 96}}}
TINY = {  # task -> (synthetic set, small pipelines: the recipes' own resize to 480-1333 px is what CPUs can't)
    "coco": ("coco", _BOXES), "voc": ("voc", _BOXES),
    "seg": ("ade20k", {"train_pipeline": {"resize": {"short": 32, "max_size": 64, "ratio_range": [0.75, 1.25]},
                                          "crop": {"size": [32, 32]}, "flip": 0.5},
                       "eval_pipeline": {"resize": {"short": 32, "max_size": 64}}}),
    "cls": ("cls", {"train_pipeline": {"random_resized_crop": {"size": 32, "scale": [0.6, 1.0]}, "flip": 0.5},
                    "eval_pipeline": {"resize": {"short": 32}, "center_crop": 32}}),
}
# One shipped recipe per task (engine, precision and schedule as shipped), the headline COCO one (`sbatch
# slurm/coco_mona.sh`, which the bucket bug of issue 31 stopped at DeepSpeed's start) first. Each trains 2 steps with
# only the data (synthetic shards, 32-64 px pipelines), the backbone size (nano), the length and the micro-batch (2)
# changed, bf16 for fp16 (the CPU accelerator has no fp16). A COCO recipe step is 16 images through the recipe's
# full-size Cascade heads: about a minute here, so the other recipes, which differ from these by method and
# backbone, are covered at DeepSpeed's start (every recipe: tests/engine/test_buckets.py), not trained.
RECIPE_RUNS = ["coco_mona_swin_l.yaml", "voc_mona_swin_l.yaml", "ade20k_mona_swin_l.yaml",
               "cls_flowers_mona_swin_l.yaml"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", RECIPE_RUNS)
def test_a_shipped_recipe_trains_two_steps_under_its_own_engine_precision_and_schedule(name, tmp_path,
                                                                                       synthetic_set):
    recipe = load_config(CONFIGS / name, ["model.pretrained=null"])
    data, pipelines = TINY[recipe.task]
    shards = synthetic_set(data, 16, 2, 40, 16) / "shards"  # 16 images: one recipe step (global batch <= 16)
    tiny = "vit_nano_patch16" if recipe.model.backbone.startswith("vit") else "swin_nano_patch4_window7"
    overrides = [
        "model.pretrained=null", f"model.backbone={tiny}", f"output_dir={tmp_path / 'run'}",
        f"data.train_shards={shards}/train.index.json", f"data.val_shards={shards}/val.index.json",
        *(f"data.{key}={json.dumps(value)}" for key, value in pipelines.items()),
        "data.batch_size=2", "data.eval_batch_size=2", "data.workers=0", "monitor.progress_bar=false",
        "train.max_steps=2", "train.epochs=null", "train.eval_at_end=false",
    ]
    if recipe.engine.precision == "fp16":
        overrides.append("engine.precision=bf16")
    cfg = load_config(CONFIGS / name, overrides)
    assert (cfg.engine.name, cfg.engine.zero_stage, cfg.schedule, cfg.train.global_batch, cfg.optim) == \
        (recipe.engine.name, recipe.engine.zero_stage, recipe.schedule, recipe.train.global_batch, recipe.optim)
    assert train(cfg) == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
