"""The official Mona recipes, value by value, with the file each value comes from; and the table docs/recipes.md shows.

Every `Fact` names a key of our config (dotted, read from the loaded config: `value_of`), the official value in our
units, and its source file in GitHub `Leiyi-Hu/mona` (or the upstream OpenMMLab file the official config inherits,
marked so). `stated` says how the official file spells the value where the form differs (epochs of a repeated
dataset, GPUs x images). `table()` renders them against the shipped configs; `mona-dist recipes` prints it and
tests/config/test_recipes.py checks both that every value equals the official one and that docs/recipes.md holds this
table.
Values a config cannot express (frozen stages, norm layers) are listed in docs/recipes.md above the table, not here;
the detectors themselves are the official configs, built in tasks/coco.py and tasks/voc.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DET, SEG, CLS = "Swin-Transformer-Object-Detection", "Swin-Transformer-Semantic-Segmentation", \
    "Swin-Transformer-Classification"
MMDET_1X = "mmdet 2.x configs/_base_/schedules/schedule_1x.py (inherited)"
MMCLS_SWIN = "mmcls 0.x configs/_base_/schedules/imagenet_bs1024_adamw_swin.py (inherited)"
CLS_MODEL = f"{CLS}/mona_configs/_base_/models/swin_transformer/large_224_det.py (not in the search index; issue 12)"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METHODS = ("mona", "full", "lora", "adapter", "adaptformer")


@dataclass(frozen=True)
class Fact:
    key: str
    official: Any
    source: str
    stated: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    configs: dict[str, str]  # method -> our config file (relative to configs/)
    sources: dict[str, str]  # method -> the official config file
    world_size: int  # the official GPU count
    facts: tuple[Fact, ...]  # every method; source "" means the method's own file
    per_method: dict[str, tuple[Fact, ...]] = field(default_factory=dict)
    variants: dict[str, str] = field(default_factory=dict)  # our other config -> the method whose facts it follows
    deviations: dict[str, str] = field(default_factory=dict)  # key -> why a variant's value differs on purpose


def keys(*names: str, **mults: dict) -> dict:
    return {"custom_keys": {n: {"lr_mult": 1.0, "decay_mult": 0.0} for n in names} | mults}


DENSE = keys("absolute_pos_embed", "relative_position_bias_table", "norm")
PARAMWISE_DEFAULTS = {"bias_lr_mult": 1.0, "bias_decay_mult": 1.0, "norm_decay_mult": 1.0, "dwconv_decay_mult": 1.0}


def paramwise(spec: dict) -> dict:
    return {**PARAMWISE_DEFAULTS, **spec}


def _coco() -> Recipe:
    files = {m: f"{DET}/mona_configs/swin-b_coco/cascade_mask_swin_base_3x_coco_sample_1_bs_16_{m}.py"
             for m in ("mona", "full", "adapter", "adaptformer")}
    f = ""
    facts = (
        Fact("model.backbone", "swin_base_patch4_window7_224", f, "embed_dim=128, depths 2-2-18-2, window 7"),
        Fact("model.pretrained", "swin_base_patch4_window7_224_22k.pth", f, "load_from (ImageNet-22k)"),
        Fact("model.drop_path_rate", 0.3, f), Fact("model.num_classes", 80, f),
        Fact("optim.lr", 1e-4, f), Fact("optim.weight_decay", 0.05, f), Fact("optim.betas", (0.9, 0.999), f),
        Fact("optim.paramwise", paramwise(DENSE), f),
        Fact("schedule.kind", "step", f), Fact("schedule.by_epoch", True, MMDET_1X, "lr_config by_epoch default"),
        Fact("schedule.milestones", [27, 33], f, "lr_config step=[27, 33]"), Fact("schedule.gamma", 0.1, MMDET_1X),
        Fact("schedule.warmup_iters", 500, MMDET_1X), Fact("schedule.warmup_ratio", 0.001, MMDET_1X),
        Fact("schedule.warmup_by_epoch", False, MMDET_1X),
        Fact("train.epochs", 36, f, "runner max_epochs=36"),
        Fact("train.global_batch", 16, f, "samples_per_gpu=1 x 16 GPUs (bs_16)"),
        Fact("engine.precision", "fp16", f, "DistOptimizerHook use_fp16=True (apex O1)"),
        Fact("engine.grad_clip", 0.0, f, "grad_clip=None"),
        Fact("data.train_pipeline.flip", 0.5, f),
        Fact("data.train_pipeline.auto_augment", {"scales": list(range(480, 801, 32)), "max_size": 1333,
                                                  "crop_scales": [400, 500, 600], "crop_size": [384, 600]}, f),
        Fact("data.eval_pipeline.resize", {"short": 800, "max_size": 1333, "ratio_range": None},
             f"{DET}/mona_configs/_base_/datasets/coco_instance_sample_1.py", "img_scale=(1333, 800)"),
        Fact("train.eval_interval", "1 epoch", f"{DET}/mona_configs/_base_/datasets/coco_instance_sample_1.py"),
        Fact("train.ckpt_interval", "1 epoch", "mmdet 2.x configs/_base_/default_runtime.py (inherited)"),
        Fact("train.log_interval", 50, "mmdet 2.x configs/_base_/default_runtime.py (inherited)"),
    )
    swin_l = "ours: the Swin-L variant (the official COCO configs are Swin-B)"
    return Recipe("COCO (Cascade Mask R-CNN)",
                  {m: f"coco_{m}_swin_b.yaml" for m in files}, files, 16, facts,
                  variants={f"coco_{m}_swin_l.yaml": m for m in files},
                  deviations={"model.backbone": swin_l, "model.pretrained": swin_l})


def _ade20k() -> Recipe:
    base = f"{SEG}/mona_configs/swin-l_ade20k/ade20k_upernet_swin_large_160k"
    files = {"mona": f"{base}_mona.py", "lora": f"{base}_lora.py", "adapter": f"{base}_adapter.py",
             "full": f"{SEG}/myconfigs/swin_large/1_ade20k_upernet_swin_large_160k_full.py",
             "adaptformer": f"{SEG}/myconfigs/swin_large/5_ade20k_upernet_swin_large_160k_adaptformer.py"}
    data = f"{SEG}/mona_configs/_base_/datasets/ade20k.py"
    f = ""
    facts = (
        Fact("model.backbone", "swin_large_patch4_window7_224", f, "embed_dim=192, depths 2-2-18-2, window 7"),
        Fact("model.pretrained", "swin_large_patch4_window7_224_22k.pth", f, "load_from (ImageNet-22k)"),
        Fact("model.num_classes", 150, f),
        Fact("model.head", {"channels": 512, "aux_channels": 256, "aux_weight": 0.4, "inference": "whole"},
             "log/ade20k/mona.txt (resolved config)", "UPerHead channels=512; FCNHead 256, loss_weight=0.4"),
        Fact("optim.weight_decay", 0.01, f), Fact("optim.betas", (0.9, 0.999), f),
        Fact("schedule.kind", "poly", f), Fact("schedule.power", 1.0, f), Fact("schedule.min_lr_ratio", 0.0, f,
                                                                                  "min_lr=0.0"),
        Fact("schedule.by_epoch", False, f), Fact("schedule.warmup_iters", 1500, f),
        Fact("schedule.warmup_ratio", 1e-6, f),
        Fact("train.max_steps", 160000, f"{SEG}/mona_configs/_base_/schedules/schedule_160k.py"),
        Fact("train.global_batch", 16, f"{DET}/log/ade20k/mona.txt", "samples_per_gpu=2 x 8 GPUs"),
        Fact("engine.precision", "fp32", f, "optimizer_config=dict(): no fp16"),
        Fact("engine.grad_clip", 0.0, f"{SEG}/mona_configs/_base_/schedules/schedule_160k.py"),
        Fact("data.train_pipeline.resize", {"short": 512, "max_size": 2048, "ratio_range": [0.5, 2.0]}, data,
             "img_scale=(2048, 512), ratio_range=(0.5, 2.0)"),
        Fact("data.train_pipeline.crop", {"size": [512, 512], "cat_max_ratio": 0.75}, data),
        Fact("data.train_pipeline.flip", 0.5, data),
        Fact("data.train_pipeline.photometric", {"brightness_delta": 32, "contrast_range": [0.5, 1.5],
                                                 "saturation_range": [0.5, 1.5], "hue_delta": 18}, data,
             "PhotoMetricDistortion() defaults"),
        Fact("data.train_pipeline.color_jitter", None, data),
        Fact("data.eval_pipeline.resize", {"short": 512, "max_size": 2048, "ratio_range": None}, data),
        Fact("train.eval_interval", "16000 step", f"{SEG}/mona_configs/_base_/schedules/schedule_160k.py"),
        Fact("train.ckpt_interval", "16000 step", f"{SEG}/mona_configs/_base_/schedules/schedule_160k.py"),
        Fact("train.log_interval", 50, f"{DET}/log/ade20k/mona.txt (resolved config)"),
    )
    others = (Fact("optim.lr", 6e-5, ""), Fact("model.drop_path_rate", 0.3, ""),
              Fact("optim.paramwise", paramwise(DENSE), ""))
    mona = (Fact("optim.lr", 3e-4, "", "0.00006 * 5.0"), Fact("model.drop_path_rate", 0.2, ""),
            Fact("optim.paramwise", paramwise(keys("absolute_pos_embed", "relative_position_bias_table", "norm",
                                                   backbone={"lr_mult": 1.0, "decay_mult": 1.0})), ""))
    per = {m: (mona if m == "mona" else others) for m in files}
    return Recipe("ADE20K (UperNet)", {m: f"ade20k_{m}_swin_l.yaml" for m in files}, files, 8, facts, per)


def _voc() -> Recipe:
    files = {m: f"{DET}/mona_configs/swin-l_voc/voc_retinanet_swin_large_1x_{m}.py" for m in METHODS}
    data = f"{DET}/mona_configs/_base_/datasets/voc0712.py"
    f = ""
    facts = (
        Fact("model.backbone", "swin_large_patch4_window7_224", f, "embed_dim=192, out_indices=(1, 2, 3)"),
        Fact("model.pretrained", "swin_large_patch4_window7_224_22k.pth", f, "load_from (ImageNet-22k)"),
        Fact("model.drop_path_rate", 0.2, f), Fact("model.num_classes", 20, f),
        Fact("optim.lr", 1e-4, f), Fact("optim.weight_decay", 0.05, f), Fact("optim.betas", (0.9, 0.999), f),
        Fact("optim.paramwise", paramwise(DENSE), f),
        Fact("schedule.kind", "step", f), Fact("schedule.by_epoch", True, f),
        Fact("schedule.milestones", [9], f, "step=[3] of 4 epochs over RepeatDataset(times=3)"),
        Fact("schedule.warmup_iters", 0, f, "lr_config without warmup"),
        Fact("train.epochs", 12, f, "max_epochs=4 x RepeatDataset times=3"),
        Fact("train.global_batch", 2, f"{DET}/log/voc/mona.txt", "samples_per_gpu=1 x 2 GPUs"),
        Fact("engine.precision", "fp16", f, "DistOptimizerHook use_fp16=True (apex O1)"),
        Fact("engine.grad_clip", 0.0, f, "grad_clip=None"),
        Fact("data.train_pipeline.resize", {"short": 600, "max_size": 1000, "ratio_range": None}, data,
             "img_scale=(1000, 600)"),
        Fact("data.train_pipeline.flip", 0.5, data),
        Fact("data.eval_pipeline.resize", {"short": 600, "max_size": 1000, "ratio_range": None}, data),
        Fact("train.eval_interval", "3 epoch", data, "interval=1 repeated-dataset epoch"),
        Fact("train.ckpt_interval", "3 epoch", f"{DET}/log/voc/mona.txt", "checkpoint_config interval=1 (x3)"),
        Fact("train.log_interval", 50, f"{DET}/log/voc/mona.txt"),
    )
    return Recipe("Pascal VOC (RetinaNet)", {m: f"voc_{m}_swin_l.yaml" for m in files}, files, 2, facts)


def _cls(dataset: str, folder: str, stem: str, classes: int, datafile: str) -> Recipe:
    files = {m: f"{CLS}/mona_configs/{folder}/{stem}{'' if m == 'full' else '_' + m}.py" for m in METHODS}
    data = f"{CLS}/mona_configs/_base_/datasets/{datafile}"
    f = ""
    facts = (
        Fact("model.backbone", "swin_large_patch4_window7_224", CLS_MODEL),
        Fact("model.pretrained", "swin_large_patch4_window7_224_22k.pth", f, "load_from (ImageNet-22k)"),
        Fact("model.drop_path_rate", 0.3, CLS_MODEL), Fact("model.head.label_smoothing", 0.0, CLS_MODEL),
        Fact("model.num_classes", classes, f),
        Fact("optim.weight_decay", 0.05, f), Fact("optim.eps", 1e-8, f), Fact("optim.betas", (0.9, 0.999), f),
        Fact("optim.paramwise", paramwise({**keys(".absolute_pos_embed", ".relative_position_bias_table"),
                                           "norm_decay_mult": 0.0, "bias_decay_mult": 0.0}), MMCLS_SWIN),
        Fact("schedule.kind", "cosine", MMCLS_SWIN, "CosineAnnealing"), Fact("schedule.by_epoch", False, MMCLS_SWIN),
        Fact("schedule.min_lr_ratio", 0.01, MMCLS_SWIN), Fact("schedule.warmup_iters", 20, MMCLS_SWIN),
        Fact("schedule.warmup_by_epoch", True, MMCLS_SWIN), Fact("schedule.warmup_ratio", 0.001, MMCLS_SWIN),
        Fact("train.epochs", 100, f), Fact("train.global_batch", 16, f, "bs_per_gpu=4 x gpu_num=4"),
        Fact("engine.precision", "fp16", f, "fp16=dict(loss_scale='dynamic')"),
        Fact("engine.grad_clip", 5.0, MMCLS_SWIN, "grad_clip=dict(max_norm=5.0)"),
        Fact("data.train_pipeline.random_resized_crop", {"size": 224, "scale": [0.08, 1.0]}, data),
        Fact("data.train_pipeline.flip", 0.5, data),
        Fact("data.eval_pipeline.resize", {"short": 256, "max_size": None, "ratio_range": None}, data),
        Fact("data.eval_pipeline.center_crop", 224, data),
        Fact("train.eval_interval", "1 epoch", data),
        Fact("train.ckpt_interval", "100 epoch", f, "interval=101 of 100 epochs: the last only"),
    )
    lr = 5e-4 * 16 / 512
    per = {m: (Fact("optim.lr", lr * (2 if m == "mona" and dataset != "voc07" else 1), "",
                    "5e-4 x 4 x 4 / 512" + (" x 2" if m == "mona" and dataset != "voc07" else "")),) for m in METHODS}
    variants = {"cls_mona_swin_l.yaml": "mona"} if dataset == "flowers" else {}  # slurm/cls_mona.sh's default
    return Recipe(f"Classification, {dataset}", {m: f"cls_{dataset}_{m}_swin_l.yaml" for m in METHODS}, files, 4,
                  facts, per, variants)


RECIPES = (_coco(), _ade20k(), _voc(),
           _cls("flowers", "swin-l_oxford-flower", "swin-large_4xb8_oxford_flower", 102, "oxford_flower_mona.py"),
           _cls("pets", "swin-l_oxford-pet", "swin-large_4xb8_oxford_pet", 37, "oxford_pet_mona.py"),
           _cls("voc07", "swin-l_voc", "swin-large_4xb8_voc", 20, "voc_mona.py"))


def value_of(cfg: Any, key: str) -> Any:
    """Our value for a fact key, in the facts' form (pipelines resolved to the task defaults, intervals with units,
    the weight file's name, the paramwise rules as a plain dict)."""
    if key.startswith(("data.train_pipeline.", "data.eval_pipeline.")):
        split = "train" if key.startswith("data.train") else "val"
        node: Any = cfg.data.pipeline(cfg.task, split)
        path = key.split(".")[2:]
    elif key in ("train.eval_interval", "train.ckpt_interval"):
        return f"{getattr(cfg.train, key.split('.')[1])} {cfg.train.interval_unit}"
    else:
        node, path = cfg, key.split(".")
    for part in path:
        node = node.get(part) if isinstance(node, dict) else getattr(node, part)
    if key == "model.pretrained" and node:
        from mona_dist.models.hub import release_file  # a timm tag: the release file its pretrained_cfg names

        return release_file(node) or os.path.basename(node)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def normalise(value: Any) -> Any:
    """Tuples as lists, floats and ints alike: what two values must share to be equal."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return float(value)


def show(value: Any) -> str:
    if isinstance(value, dict) and "custom_keys" in value:
        parts = []
        for key, mults in value["custom_keys"].items():
            changed = {n: v for n, v in mults.items() if v != 1.0} or {"lr_mult": 1.0}
            parts.append(f"`{key}` " + ", ".join(f"{n} {v:g}" for n, v in changed.items()))
        parts += [f"{k} {v:g}" for k, v in value.items() if k != "custom_keys" and v != 1.0]
        return "; ".join(parts)
    if isinstance(value, dict):
        return ", ".join(f"{k} {show(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value)


ABBREVIATIONS = {DET: "det", SEG: "seg", CLS: "cls"}


def short(source: str) -> str:
    for fork, abbr in ABBREVIATIONS.items():
        source = source.replace(fork + "/", abbr + "/")
    return source


def differences() -> list[str]:
    """One line per shipped value that is not the official one (deviations of variants excepted)."""
    from mona_dist.config.loader import load_config

    out = []
    for recipe in RECIPES:
        checks = [(name, method, False) for method, name in recipe.configs.items()]
        checks += [(name, method, True) for name, method in recipe.variants.items()]
        for name, method, variant in checks:
            cfg = load_config(CONFIGS / name)
            for fact in (*recipe.facts, *recipe.per_method.get(method, ())):
                if variant and fact.key in recipe.deviations:
                    continue
                ours = value_of(cfg, fact.key)
                if normalise(ours) != normalise(fact.official):
                    out.append(f"configs/{name}: {fact.key} is {show(ours)}, official {show(fact.official)} "
                               f"({short(fact.source or recipe.sources[method])})")
    return out


def rows(recipe: Recipe) -> list[tuple[str, str, Fact, Any]]:
    """(config, method, fact, our value) for every fact of every method config of a recipe."""
    from mona_dist.config.loader import load_config

    out = []
    for method, name in recipe.configs.items():
        cfg = load_config(CONFIGS / name)
        for fact in (*recipe.facts, *recipe.per_method.get(method, ())):
            out.append((name, method, fact, value_of(cfg, fact.key)))
    return out


def table() -> str:
    """The recipe section body of docs/recipes.md: per recipe, key | official | ours | official file (first method's
    config for the shared keys; per-method keys once per method)."""
    lines = ["Official files: `det/` = `Swin-Transformer-Object-Detection/`, `seg/` = "
             "`Swin-Transformer-Semantic-Segmentation/`, `cls/` = `Swin-Transformer-Classification/` in `Leiyi-Hu/mona`.",
             ""]
    for recipe in RECIPES:
        first = next(iter(recipe.configs))
        also = ", ".join(f"`{c}`" for c in [*list(recipe.configs.values())[1:], *recipe.variants])
        lines += [f"**{recipe.name}**, {recipe.world_size} GPUs officially: `configs/{recipe.configs[first]}`; "
                  f"the same values in {also}" + (f" (except {', '.join(recipe.deviations)}: "
                                                    f"{next(iter(recipe.deviations.values()))})" if recipe.deviations
                                                   else "") + ".", "",
                  "| key | official | ours | official file |", "| --- | --- | --- | --- |"]
        for name, method, fact, ours in rows(recipe):
            shared = fact in recipe.facts
            if shared and method != first:
                continue
            key = fact.key if shared else f"{fact.key} ({method})"
            official = show(fact.official) + (f" ({fact.stated})" if fact.stated else "")
            source = short(fact.source or recipe.sources[method])
            lines.append(f"| `{key}` | {official} | {show(ours)} | {source} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
