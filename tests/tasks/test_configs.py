"""Every shipped config of the dense and classification recipes loads, validates, passes its task's checks and
builds its model (each recipe value against the official one: tests/config/test_recipes.py). Swin-L / ViT-L are
built on the meta device (shapes only, no memory, well under a second each)."""

from pathlib import Path

import pytest
import torch

from mona_dist.config import load_config
from mona_dist.models import Backbone
from mona_dist.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OWNED_BY_OTHERS = {"base.yaml", "demo.yaml", "cpu/base.yaml", "cpu/cls.yaml"}
FILES = sorted(
    str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
    if "_base_" not in p.parts and str(p.relative_to(CONFIGS)) not in OWNED_BY_OTHERS
)
METHODS = ("mona", "e3va", "mona_hw", "full", "lora", "adapter", "adaptformer")


def test_every_task_and_method_has_its_swin_l_recipe():
    for prefix in ("coco", "ade20k", "voc", "cls_flowers", "cls_pets", "cls_voc07"):
        for method in METHODS:
            assert f"{prefix}_{method}_swin_l.yaml" in FILES
    assert {"coco_mona_vit_l.yaml", "ade20k_mona_vit_l.yaml", "coco_mona_swin_l.yaml", "cls_mona_swin_l.yaml"} <= set(FILES)
    # the official COCO configs are Swin-B (recipe values: tests/config/test_recipes.py)
    assert {f"coco_{m}_swin_b.yaml" for m in ("mona", "full", "adapter", "adaptformer")} <= set(FILES)
    assert {"cpu/ade20k.yaml", "cpu/coco.yaml", "cpu/voc.yaml"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_config_validates_and_builds(name):
    cfg = load_config(CONFIGS / name, ["model.pretrained=null"])  # the weight files are not in the repository
    task = TASKS.get(cfg.task)
    task.check(cfg)
    large = not name.startswith("cpu/")
    with torch.device("meta" if large else "cpu"):
        model = task.build_model(cfg)
    assert isinstance(model.backbone, Backbone)
    assert model.backbone.method == cfg.model.method
    assert any(p.requires_grad for p in model.backbone.parameters()) or cfg.model.method == "fixed"


def test_class_count_falls_back_to_the_shard_index(tmp_path):
    from mona_dist.config.loader import ConfigError
    from mona_dist.data.synthetic import build
    from mona_dist.tasks.heads import class_count

    build("voc", str(tmp_path / "voc"), num_train=4, num_val=2, size=48)
    shards = tmp_path / "voc" / "shards" / "train.index.json"
    cfg = load_config(CONFIGS / "cpu" / "voc.yaml", ["model.num_classes=null", f"data.train_shards={shards}"])
    assert class_count(cfg) == 4  # circle, square, triangle, diamond
    assert class_count(load_config(CONFIGS / "cpu" / "voc.yaml", ["model.num_classes=7"])) == 7
    index = shards.read_text().replace('"classes": [', '"classes_": [')
    shards.write_text(index)
    with pytest.raises(ConfigError, match="model.num_classes"):
        class_count(cfg)


@pytest.mark.parametrize("name", ["cpu/cls.yaml", "cpu/ade20k.yaml", "cpu/coco.yaml", "cpu/voc.yaml"])
def test_model_swin_arithmetic_reaches_the_backbone(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.swin_arithmetic == "official"
    cfg = load_config(CONFIGS / name, ["model.swin_arithmetic=timm"])
    with torch.device("meta"):
        backbone = TASKS.get(cfg.task).build_model(cfg).backbone
    assert backbone.swin_arithmetic == "timm"
    assert all(blk.swin_arithmetic == "timm" for st in backbone.trunk.layers for blk in st.blocks
               if hasattr(blk, "swin_arithmetic"))
