"""Weight-decay / lr groups equal mmcv 1.x DefaultOptimizerConstructor with each official recipe's paramwise_cfg.

Two references: mmengine 0.10.7's DefaultOptimWrapperConstructor (a real implementation of the same rules, run on
a container that names our modules as the official models do), and the rule restated here from mmcv 1.x's code for
the one place mmengine changed it (the order of the depthwise-conv and bias rules). Tolerance: exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mona_dist.config import load_config
from mona_dist.config.schema import OptimConfig, ParamwiseConfig
from mona_dist.engine.optim import official_name, param_groups
from mona_dist.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DENSE_KEYS = {"absolute_pos_embed": {"decay_mult": 0.0}, "relative_position_bias_table": {"decay_mult": 0.0},
              "norm": {"decay_mult": 0.0}}
# Each official recipe's paramwise_cfg, as its config file states it (see mona_dist/config/recipes.py for the files).
OFFICIAL = {
    "coco/voc (all methods)": {"custom_keys": DENSE_KEYS},
    "ade20k mona": {"custom_keys": {"backbone": {"lr_mult": 1.0}, **DENSE_KEYS}},
    "ade20k other methods": {"custom_keys": DENSE_KEYS},
    "cls (mmcls imagenet_bs1024_adamw_swin)": {
        "norm_decay_mult": 0.0, "bias_decay_mult": 0.0,
        "custom_keys": {".absolute_pos_embed": {"decay_mult": 0.0}, ".relative_position_bias_table": {"decay_mult": 0.0}}},
}
TASK_CONFIG = {"cls": "cpu/cls.yaml", "seg": "cpu/ade20k.yaml", "coco": "cpu/coco.yaml", "voc": "cpu/voc.yaml"}


def official_container(task: str, model: nn.Module) -> nn.Module:
    """Our task model's modules under the official models' top-level names (mmcls / mmseg / mmdet)."""
    root = nn.Module()
    if task == "cls":
        root.backbone, root.head = model.backbone, model.head
    elif task == "seg":
        root.backbone, root.decode_head, root.auxiliary_head = model.backbone, model.net.decode_head, \
            model.net.auxiliary_head
    else:
        d = model.net  # mmdet's detector: our Backbone wraps the Swin as `body` under mmdet's `backbone`
        root.backbone, root.neck = d.backbone.body, d.neck
        if task == "coco":
            root.rpn_head, root.roi_head = d.rpn_head, d.roi_head
        else:
            root.bbox_head = d.bbox_head
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in root.parameters() if p.requires_grad}, "container misses trainable params"
    return root


def ours(model: nn.Module, paramwise: dict, lr=1e-3, wd=0.05) -> dict[int, tuple[float, float]]:
    cfg = OptimConfig(lr=lr, weight_decay=wd, paramwise=ParamwiseConfig.model_validate(paramwise))
    return {id(p): (g["lr"], g["weight_decay"]) for g in param_groups(model, cfg) for p in g["params"]}


def mmengine_groups(root: nn.Module, paramwise: dict, lr=1e-3, wd=0.05) -> dict[int, tuple[float, float]]:
    from mmengine.optim import DefaultOptimWrapperConstructor

    ctor = DefaultOptimWrapperConstructor(dict(optimizer=dict(type="AdamW", lr=lr, weight_decay=wd)), paramwise)
    groups: list[dict] = []
    ctor.add_params(groups, root)
    return {id(g["params"][0]): (g.get("lr", lr), g.get("weight_decay", wd)) for g in groups}


def dwconv_biases(root: nn.Module) -> set[int]:
    return {id(m.bias) for m in root.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels
            and m.bias is not None and m.bias.requires_grad}


def build(task: str, method: str) -> nn.Module:
    cfg = load_config(CONFIGS / TASK_CONFIG[task], [f"model.method={method}"])
    return TASKS.get(cfg.task).build_model(cfg)


CASES = [("coco", "mona", "coco/voc (all methods)"), ("voc", "mona", "coco/voc (all methods)"),
         ("voc", "full", "coco/voc (all methods)"), ("seg", "mona", "ade20k mona"),
         ("seg", "lora", "ade20k other methods"), ("seg", "adapter", "ade20k other methods"),
         ("cls", "mona", "cls (mmcls imagenet_bs1024_adamw_swin)"), ("cls", "full", "cls (mmcls imagenet_bs1024_adamw_swin)")]


@pytest.mark.parametrize("task, method, recipe", CASES)
def test_groups_equal_mmcv_rules_for_each_official_recipe(task, method, recipe):
    torch.manual_seed(0)
    model = build(task, method)
    root = official_container(task, model)
    got, ref = ours(model, OFFICIAL[recipe]), mmengine_groups(root, OFFICIAL[recipe])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(got) == trainable  # frozen weights never reach the optimizer
    differ = {k for k in got if got[k] != ref[k]}
    # mmengine checks `bias` before `depthwise conv`; mmcv 1.x (the official runs) checks dwconv first, and its
    # dwconv_decay_mult defaults to 1: a depthwise conv's bias decays unless a custom key matches.
    expected = dwconv_biases(root) if "bias_decay_mult" in OFFICIAL[recipe] else set()
    assert differ == expected
    assert all(got[k][1] == 0.05 and ref[k][1] == 0.0 for k in differ)
    if method == "mona" and task == "cls":
        assert len(differ) == 3 * 2 * sum(1 for n, _ in model.named_modules() if n.endswith("post_attn"))


def decisions(model: nn.Module, paramwise: dict) -> dict[str, float]:
    by_id = ours(model, paramwise)
    return {n: by_id[id(p)][1] for n, p in model.named_parameters() if p.requires_grad}


def test_official_facts_per_recipe():
    """Spot checks stated from the official configs: which Mona tensors decay in each recipe."""
    seg = decisions(build("seg", "mona"), OFFICIAL["ade20k mona"])
    mona = "net.backbone.body.trunk.layers.0.blocks.0.post_attn"
    # the `backbone` key is the longest match inside the backbone: Mona's LayerNorm, gamma and biases all decay
    assert {seg[f"{mona}.{leaf}"] for leaf in ("norm.weight", "norm.bias", "gamma", "gammax", "project1.bias")} == {0.05}
    assert seg["net.decode_head.bottleneck.bn.weight"] == 0.05  # mmseg names BN "bn": no "norm" key, no norm rule
    coco = decisions(build("coco", "mona"), OFFICIAL["coco/voc (all methods)"])
    m = "net.backbone.body.trunk.layers.0.blocks.0.post_mlp"
    assert coco[f"{m}.norm.weight"] == 0.0 and coco[f"{m}.gamma"] == 0.05 and coco[f"{m}.project2.bias"] == 0.05
    assert coco["net.neck.lateral_convs.0.conv.bias"] == 0.05  # no bias rule in the dense recipes
    cls = decisions(build("cls", "mona"), OFFICIAL["cls (mmcls imagenet_bs1024_adamw_swin)"])
    m = "backbone.trunk.layers.1.blocks.1.post_attn"
    assert cls[f"{m}.norm.weight"] == 0.0 and cls[f"{m}.project1.bias"] == 0.0 and cls["head.bias"] == 0.0
    assert cls[f"{m}.adapter_conv.conv1.bias"] == 0.05 and cls[f"{m}.adapter_conv.projector.bias"] == 0.0
    assert cls[f"{m}.gamma"] == 0.05 and cls[f"{m}.project1.weight"] == 0.05


def official_spelling(ours_name: str) -> str:
    """Our backbone-relative name as the official Swin spells it (restated from the official state dicts)."""
    name = ours_name.replace("trunk.", "").replace("post_attn", "my_module_1").replace("post_mlp", "my_module_2")
    if name.startswith("out_norms."):
        name = "norm" + name[len("out_norms."):]
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[2] == "downsample":  # timm merges at the next stage's start
        parts[1] = str(int(parts[1]) - 1)
    return "backbone." + ".".join(parts)


@pytest.mark.parametrize("method", ["mona", "full", "lora", "adapter", "adaptformer"])
def test_key_matching_sees_what_the_official_names_show(method):
    model = build("seg", method)
    keys = ("norm", "backbone", "relative_position_bias_table", "absolute_pos_embed", "bias", "neck", "head")
    for name, _ in model.backbone.named_parameters():
        ours_name = official_name("net.backbone.body." + name, "net.backbone.body")
        official = official_spelling(name)
        assert [k in ours_name for k in keys] == [k in official for k in keys], (ours_name, official)
    assert official_name("net.decode_head.conv_seg.weight", "net.backbone.body") == "decode_head.conv_seg.weight"
    assert official_name("net.neck.fpn_convs.0.conv.weight", "net.backbone.body") == \
        "neck.fpn_convs.0.conv.weight"  # mmdet's neck: no "backbone" in its names
    assert official_name("head.bias", "backbone") == "head.bias"


def test_longest_key_wins_ties_alphabetical_and_lr_mult():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
            self.head = nn.Linear(2, 2)

    model = Tiny()
    pw = {"custom_keys": {"backbone": {"lr_mult": 0.1}, "backbone.1": {"lr_mult": 2.0, "decay_mult": 0.0},
                          "head.bias": {"lr_mult": 3.0}, "head.weig": {"lr_mult": 4.0}}, "bias_lr_mult": 5.0}
    got = {n: v for n, p in model.named_parameters() for k, v in ours(model, pw).items() if k == id(p)}
    assert got["backbone.0.weight"] == (1e-4, 0.05) and got["backbone.1.weight"] == (2e-3, 0.0)
    assert got["head.bias"] == (3e-3, 0.05) and got["head.weight"] == (4e-3, 0.05)
    assert ours(model, {"bias_lr_mult": 5.0})[id(model.head.bias)] == (5e-3, 0.05)
    assert ours(model, {"bias_lr_mult": 5.0})[id(model.backbone[1].bias)] == (1e-3, 0.05)  # a norm's bias keeps it
    tie = {"custom_keys": {"head": {"lr_mult": 7.0}, "ad.w": {"lr_mult": 8.0}}}  # same length: alphabetical first
    assert ours(model, tie)[id(model.head.weight)] == (8e-3, 0.05) and ours(model, tie)[id(model.head.bias)][0] == 7e-3


def test_no_trainable_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), OptimConfig())
