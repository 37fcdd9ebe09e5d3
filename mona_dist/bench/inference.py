"""Inference cost of the methods, measured side by side: eval-mode latency and images/s at the training inputs.

Every method's model (the same one its training row measured: backbone + the shared head, or the task's detector)
is built once more, put in eval mode and run under `torch.inference_mode()` (autocast to the training precision
on bf16/fp16; weights stay fp32), without an engine: each rank runs the whole model. LoRA is timed twice: as
trained (`lora`, the low-rank path beside qkv) and folded into qkv (`lora (merged)`, a plain nn.Linear, what
`mona-dist export --merge` writes); the merged row records how far its backbone features are from the unmerged
ones (`merged_max_abs_diff`, fp32, with LoRA's B drawn non-zero so that the merge changes qkv). Timing is
interleaved like training's: `steps` rounds, each running one forward of every model in a rotated order.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..distributed import all_reduce_max
from ..models import Backbone
from .runner import COMPILED, BenchSpec, _free, _sync, build_model, parse_method

MERGED = " (merged)"  # label suffix of a LoRA method folded into qkv


def _backbone(model: nn.Module) -> Backbone:
    return next(m for m in model.modules() if isinstance(m, Backbone))


def _images(batch: dict) -> torch.Tensor:
    images = batch["images"]
    return torch.stack(images) if isinstance(images, list) else images


def _autocast(spec: BenchSpec, device: torch.device):
    if spec.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if spec.precision == "bf16" else torch.float16)


def build_eval_models(spec: BenchSpec, device: torch.device) -> dict[str, nn.Module]:
    """{label: eval model} for every eager method, plus `<lora label> (merged)` after each LoRA one."""
    from ..export.merge import fold_lora_

    models = {}
    for label in [m for m in spec.labels() if not m.endswith(COMPILED)]:
        method, opts = parse_method(label)
        torch.manual_seed(spec.seed)  # the same frozen weights and head as the training rows
        model = build_model(spec, method, opts).to(device).eval()
        models[label] = model
        if method == "lora":
            g = torch.Generator().manual_seed(spec.seed)
            with torch.no_grad():  # B starts at zero: a trained LoRA's is not, and the merge must change qkv
                for name, p in model.named_parameters():
                    if ".lora_B_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            merged = copy.deepcopy(model)
            fold_lora_(merged)
            models[label + MERGED] = merged
    return models


def merged_difference(models: dict[str, nn.Module], batch: dict) -> dict[str, float]:
    """Max |merged - unmerged| over every backbone output, in fp32, per merged label."""
    out = {}
    images = _images(batch).float()
    with torch.inference_mode():
        for label, merged in models.items():
            if label.endswith(MERGED):
                a, b = _backbone(models[label.removesuffix(MERGED)])(images), _backbone(merged)(images)
                out[label] = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return out


def measure_inference(spec: BenchSpec, batch: dict, device: torch.device, world_size: int = 1) -> list[dict]:
    """One dict per eval model: label, latency median and p10-p90 (s), images/s; merged rows carry their
    feature difference. Nothing is built when `spec.steps` is 0."""
    if spec.steps <= 0:
        return []
    models = build_eval_models(spec, device)
    diffs = merged_difference(models, batch)
    runs = list(models.items())
    times: dict[str, list[float]] = {label: [] for label, _ in runs}
    with torch.inference_mode(), _autocast(spec, device):
        for _ in range(spec.warmup):
            for _, model in runs:
                model(batch)
        for i in range(spec.steps):  # interleaved, order rotated each round
            for label, model in runs[i % len(runs):] + runs[: i % len(runs)]:
                _sync(device)
                t0 = time.perf_counter()
                model(batch)
                _sync(device)
                times[label].append(all_reduce_max(time.perf_counter() - t0))
    rows = []
    for label, ts in times.items():
        ts.sort()
        median = statistics.median(ts)
        row: dict[str, Any] = {
            "method": label,
            "infer_latency_s": median,
            "infer_latency_p10_s": ts[int(0.1 * (len(ts) - 1))],
            "infer_latency_p90_s": ts[math.ceil(0.9 * (len(ts) - 1))],
            "infer_images_per_s": spec.batch_size * world_size / median,
        }
        if label in diffs:
            row["merged_max_abs_diff"] = diffs[label]
        rows.append(row)
    del models, runs
    _free(device)
    return rows


def add_inference(rows: list[dict], inference: list[dict]) -> None:
    """Inference columns onto the training rows of the same label; merged rows appended after their method's
    (training fields absent: `inference_only`); `infer_vs_full` is each latency over full's."""
    by = {r["method"]: r for r in rows}
    for inf in inference:
        if inf["method"] in by:
            by[inf["method"]].update(inf)
        else:
            unmerged = inf["method"].removesuffix(MERGED)
            row = {"method": inf["method"], "inference_only": True, **inf}
            rows.insert(rows.index(by[unmerged]) + 1, row)
    full = by.get("full", {}).get("infer_latency_s")
    for r in rows:
        lat = r.get("infer_latency_s")
        r["infer_vs_full"] = lat / full if full and lat is not None else None
