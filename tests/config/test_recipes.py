"""Every shipped recipe value equals the official one (mona_dist/config/recipes.py names each source file), the
recipe table in docs/recipes.md is what `mona-dist recipes` prints, and each sbatch script's default world size
gives its recipe's images per step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mona_dist.cli import main
from mona_dist.config import load_config
from mona_dist.config.recipes import RECIPES, differences, normalise, rows, show, table
from mona_dist.config.resolve import resolve_batch

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_value_is_the_official_one():
    assert differences() == []
    compared = sum(len(rows(r)) for r in RECIPES)
    assert compared > 600  # every fact of every method config of every recipe


def test_the_check_fails_on_a_changed_value(tmp_path, monkeypatch):
    # A recipe file with one value off: the check must name it.
    import mona_dist.config.recipes as recipes

    (tmp_path / "_base_").mkdir()
    for p in (REPO / "configs").rglob("*.yaml"):
        target = tmp_path / p.relative_to(REPO / "configs")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(p.read_text())
    bad = tmp_path / "_base_" / "voc_swin_l.yaml"
    bad.write_text(bad.read_text().replace("drop_path_rate: 0.2", "drop_path_rate: 0.3"))
    monkeypatch.setattr(recipes, "CONFIGS", tmp_path)
    diffs = recipes.differences()
    assert len(diffs) == 5 and all("model.drop_path_rate is 0.3, official 0.2" in d for d in diffs)


def test_docs_recipe_table_is_the_generated_one(capsys):
    page = (REPO / "docs" / "recipes.md").read_text()
    block = re.search(r"<!-- recipes:begin -->\n(.*)<!-- recipes:end -->", page, re.S)
    assert block, "docs/recipes.md lacks the recipes block"
    assert block.group(1) == table()
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out == table()
    assert main(["recipes", "--check"]) == 0
    # and says so: it printed nothing when all matched (issue 24)
    assert re.fullmatch(r"recipes: all \d{3,} official values match the \d+ shipped configs\n",
                        capsys.readouterr().out)


def test_issue_12_differences_are_fixed():
    """The values issue 12 found different, each now the official one."""
    get = {r.name.split(" ")[0].rstrip(","): r for r in RECIPES}
    assert load_config(REPO / "configs/coco_mona_swin_b.yaml").model.backbone == "swin_base_patch4_window7_224"
    assert load_config(REPO / "configs/coco_mona_swin_l.yaml").model.backbone == "swin_large_patch4_window7_224"
    voc = load_config(REPO / "configs/voc_mona_swin_l.yaml")
    assert (voc.model.drop_path_rate, voc.schedule.warmup_iters, voc.train.global_batch) == (0.2, 0, 2)
    ade = load_config(REPO / "configs/ade20k_mona_swin_l.yaml")
    assert ade.engine.precision == "fp32" and ade.data.pipeline("seg", "train").color_jitter is None
    assert ade.data.pipeline("seg", "train").photometric.brightness_delta == 32
    cls = load_config(REPO / "configs/cls_pets_mona_swin_l.yaml")
    assert cls.model.drop_path_rate == 0.3 and cls.model.head["label_smoothing"] == 0.0
    for name in ("coco_mona_swin_b.yaml", "coco_mona_swin_l.yaml", "voc_mona_swin_l.yaml"):
        assert load_config(REPO / "configs" / name).engine.precision == "fp16"
    coco = load_config(REPO / "configs/coco_adapter_swin_l.yaml").data.pipeline("coco", "train")
    assert coco.resize is None and coco.auto_augment.scales == tuple(range(480, 801, 32))
    assert get["COCO"].world_size == 16 and get["ADE20K"].world_size == 8


def sbatch_defaults(script: Path) -> tuple[int, str]:
    text = script.read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    per_node = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1))
    config = re.search(r"^mona_train (\S+)", text, re.M).group(1)
    return nodes * per_node, config


@pytest.mark.parametrize("task", ["coco", "ade20k", "voc", "cls"])
def test_sbatch_default_world_size_gives_the_recipe_batch(task):
    world, config = sbatch_defaults(REPO / "slurm" / f"{task}_mona.sh")
    cfg = load_config(REPO / config)
    resolved, plan = resolve_batch(cfg, world)
    assert plan.global_batch == cfg.train.global_batch and plan.lr_scale == 1.0
    assert resolved.data.batch_size * resolved.engine.grad_accum * world == cfg.train.global_batch
    recipe = next(r for r in RECIPES if config.split("/")[-1] in [*r.configs.values(), *r.variants])
    assert world == recipe.world_size  # the official GPU count, one image share per GPU as the official runs


def test_show_renders_paramwise_compactly():
    pw = {"custom_keys": {"norm": {"lr_mult": 1.0, "decay_mult": 0.0}}, "bias_decay_mult": 0.0,
          "bias_lr_mult": 1.0, "norm_decay_mult": 1.0, "dwconv_decay_mult": 1.0}
    assert show(pw) == "`norm` decay_mult 0; bias_decay_mult 0"
    assert normalise((1, 2)) == normalise([1.0, 2.0])
