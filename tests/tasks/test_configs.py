"""Every shipped config of the dense and classification recipes loads, validates, passes its task's checks and
builds its model. Swin-L / ViT-L are built on the meta device (shapes only, no memory, well under a second each)."""

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


def test_recipe_values():
    coco = load_config(CONFIGS / "coco_mona_swin_l.yaml")
    assert (coco.model.drop_path_rate, coco.optim.lr, coco.optim.weight_decay) == (0.3, 1e-4, 0.05)
    assert coco.schedule.kind == "step" and coco.schedule.warmup_iters == 500
    assert [round(m / coco.train.max_steps * 36) for m in coco.schedule.milestones] == [27, 33]
    ade = {m: load_config(CONFIGS / f"ade20k_{m}_swin_l.yaml") for m in ("mona", "lora")}
    assert (ade["mona"].optim.lr, ade["mona"].model.drop_path_rate) == (3e-4, 0.2)
    assert (ade["lora"].optim.lr, ade["lora"].model.drop_path_rate) == (6e-5, 0.3)
    assert ade["mona"].train.max_steps == 160000 and ade["mona"].schedule.kind == "poly"
    assert ade["mona"].data.batch_size == 2 and ade["mona"].schedule.warmup_iters == 1500
    flowers = {m: load_config(CONFIGS / f"cls_flowers_{m}_swin_l.yaml") for m in ("mona", "adapter")}
    assert flowers["adapter"].optim.lr == pytest.approx(5e-4 * 16 / 512)
    assert flowers["mona"].optim.lr == pytest.approx(2 * 5e-4 * 16 / 512)
    assert flowers["mona"].engine.grad_clip == 5.0 and flowers["mona"].engine.precision == "fp16"
    assert load_config(CONFIGS / "coco_mona_vit_l.yaml").model.backbone == "vit_large_patch16_224"


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
