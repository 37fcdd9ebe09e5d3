"""Memory and time of tuning methods, measured side by side in one run.

Protocol (every method: same backbone, head, inputs, precision and engine):
1. Memory, method by method, each alone: build, `warmup` steps, then one step whose saved activations are counted
   with saved-tensor hooks; the peak: on CUDA max allocated over one more step, counted from before the method was
   built (MAX over ranks); on CPU the exact accounting params + grads + optimizer state + saved activations after
   the counted step, beside the peak RSS above the process's RSS before the method was built, over its build,
   warm-up and step (no further step: on 2 CPU cores a paper-size detector step takes 14-54 s (measured)). The
   method's engine is then freed (and on CPU the freed heap handed back to the OS), so no earlier engine is
   resident while the next one is measured.
2. Time, interleaved: every method is built again; `steps` rounds each run one full step (forward, backward,
   optimizer) of every method, in an order rotated every round, so drift and noise hit all methods alike. Median
   and p10-p90 spread per method.
With `compile`, every method runs twice, eager and under `engine.compile` (`<method>+compile`), interleaved like
the others; the first step of each build is timed apart (`first_step_s`: compilation, for a compiled one).
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from ..adapters import count_parameters, parse_method_options
from ..adapters.blocks import Recompute
from ..distributed import all_reduce_max
from ..extras import require
from ..models import build_backbone, checkpoint_units
from .accounting import (LiveTensorPeak, PeakMemory, fsdp_model_state_estimate, model_state_bytes,
                         model_state_tensors, saved_activation_bytes, zero_model_state_estimate)

COMPILED = "+compile"  # label suffix of a method's compiled run


class BenchModel(nn.Module):
    """Backbone + a light head that is identical across methods; forward(batch) -> {"loss": ...} like a task model.

    cls: global-average-pooled last stage -> linear. seg: an FPN over every output, the levels summed at the finest
    scale, a 1x1 classifier, per-pixel cross-entropy (a semantic-FPN head: dense, multi-scale, cheap).
    coco and voc are not built here: they are the tasks' own detectors (`build_model`).
    """

    def __init__(self, backbone: nn.Module, task: str, num_classes: int = 100):
        super().__init__()
        self.backbone, self.task = backbone, task
        if task == "cls":
            self.head = nn.Linear(backbone.out_channels[-1], num_classes)
        elif task == "seg":
            self.fpn = FeaturePyramidNetwork(backbone.out_channels, 128)
            self.head = nn.Conv2d(128, num_classes, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training mode: {"loss"}; eval mode (the inference timing): {"logits"}, as the task models."""
        feats = self.backbone(batch["images"])
        if self.task == "cls":
            logits = self.head(feats[-1].mean(dim=(2, 3)))
            target = batch["labels"]
        else:
            levels = list(self.fpn({str(i): f for i, f in enumerate(feats)}).values())
            fused = sum(F.interpolate(p, size=levels[0].shape[-2:], mode="bilinear") for p in levels)
            logits = F.interpolate(self.head(fused), size=batch["images"].shape[-2:], mode="bilinear")
            target = batch["masks"]
        return {"loss": F.cross_entropy(logits.float(), target)} if self.training else {"logits": logits}


# Per task: (backbone, (H, W), classes) of the papers' memory tables (V-PETL: COCO Cascade Mask R-CNN Swin-B at
# 1333x800, VOC RetinaNet Swin-L at 1000x600); a light head's defaults otherwise.
TASK_DEFAULTS = {
    "cls": ("swin_base_patch4_window7_224", (224, 224), 100),
    "seg": ("swin_base_patch4_window7_224", (224, 224), 100),
    "coco": ("swin_base_patch4_window7_224", (800, 1333), 80),
    "voc": ("swin_large_patch4_window7_224", (600, 1000), 20),
}
DETECTION = ("coco", "voc")


def build_model(spec: "BenchSpec", method: str, opts: dict[str, Any]) -> nn.Module:
    """The model every method shares but for its backbone method: a BenchModel, or the task's own detector
    (coco: mmdet Cascade Mask R-CNN, voc: mmdet RetinaNet over Swin stages 1-3), with the recipe's heads."""
    if spec.task in DETECTION:
        require(f"bench --task {spec.task}", "det")  # one line, not a failure report, without the extra
    if spec.task == "coco":
        from ..tasks.coco import build_cascade

        return build_cascade(spec.backbone, method, spec.num_classes, method_options=opts)
    if spec.task == "voc":
        from ..tasks.voc import build_retinanet

        return build_retinanet(spec.backbone, method, spec.num_classes, method_options=opts)
    outs = (-1,) if spec.task == "cls" else None  # a classifier reads the last stage only
    return BenchModel(build_backbone(spec.backbone, method, out_indices=outs, **opts), spec.task, spec.num_classes)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """'e3va' or 'e3va:lora_fa=true,rank=4' -> (method, options)."""
    name, _, rest = spec.partition(":")
    return name, parse_method_options(filter(None, rest.split(",")))


def split_methods(text: str) -> list[str]:
    """'full,mona:recompute=false,fused=false,lora' -> ['full', 'mona:recompute=false,fused=false', 'lora']: a
    comma-separated item with '=' but no ':' is one more option of the method before it."""
    labels: list[str] = []
    for item in filter(None, text.split(",")):
        if labels and "=" in item and ":" not in item and ":" in labels[-1]:
            labels[-1] += "," + item
        else:
            labels.append(item)
    return labels


@dataclass
class BenchSpec:
    backbone: str
    methods: list[str]
    task: str = "cls"
    batch_size: int = 2
    img_size: int | tuple[int, int] = 224  # a side, or (H, W)
    steps: int = 10
    warmup: int = 2
    engine: str = "ddp"
    zero_stage: int = 0
    activation_checkpointing: bool = False
    precision: str = "fp32"
    num_classes: int = 100
    objects: int = 4  # ground-truth objects per image of a detection batch (the heads' memory grows with them)
    seed: int = 0
    compile: bool = False  # also measure every method under engine.compile
    inference: bool = True  # also time every method in eval mode (bench/inference.py)

    def labels(self) -> list[str]:
        return [m + suffix for m in self.methods for suffix in ("", COMPILED)[: 2 if self.compile else 1]]

    @property
    def hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)


@dataclass
class MethodRun:
    label: str
    engine: Any
    row: dict[str, Any]
    times: list[float] = field(default_factory=list)


def make_batch(spec: BenchSpec, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(spec.seed)
    h, w = spec.hw
    images = torch.randn(spec.batch_size, 3, h, w, generator=g)
    if spec.task in DETECTION:  # `objects` per image in the detection batch format; coco adds instance masks
        targets = []
        size = torch.tensor([w, h], dtype=torch.float32)
        n = spec.objects
        for _ in range(spec.batch_size):
            xy = torch.rand(n, 2, generator=g) * size * 0.6
            boxes = torch.cat([xy, xy + (torch.rand(n, 2, generator=g) * 0.3 + 0.1) * size], 1)
            t = {"boxes": boxes.to(device), "labels": torch.randint(1, spec.num_classes + 1, (n,), generator=g).to(device)}
            if spec.task == "coco":
                masks = torch.zeros(n, h, w, dtype=torch.uint8)
                for k, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
                    masks[k, y1:y2, x1:x2] = 1
                t["masks"] = masks.to(device)
            targets.append(t)
        return {"images": list(images.to(device)), "targets": targets}
    if spec.task == "cls":
        target = {"labels": torch.randint(spec.num_classes, (spec.batch_size,), generator=g)}
    else:
        target = {"masks": torch.randint(spec.num_classes, (spec.batch_size, h, w), generator=g)}
    return {k: v.to(device) for k, v in {"images": images, **target}.items()}


def _step(engine, batch) -> torch.Tensor:
    loss = engine(batch)["loss"]
    engine.backward(loss)
    engine.step()
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(spec: BenchSpec, label: str, device: torch.device, world_size: int) -> tuple[nn.Module, Any]:
    from ..config.schema import EngineConfig, OptimConfig
    from ..engine import build_engine

    compiled = label.endswith(COMPILED)
    method, opts = parse_method(label.removesuffix(COMPILED))
    ecfg = EngineConfig(name=spec.engine, zero_stage=spec.zero_stage, precision=spec.precision,
                        activation_checkpointing=spec.activation_checkpointing, compile=compiled)
    torch.manual_seed(spec.seed)  # same frozen weights and head init for every method
    model = build_model(spec, method, opts)
    # the device given, not `pick_device()`: `--device cpu` on a GPU host measures the CPU
    engine = build_engine(model, ecfg, OptimConfig(lr=1e-5, weight_decay=0.05), micro_batch_size=spec.batch_size,
                          world_size=world_size, device=device)
    engine.train()
    return model, engine


def _free(device: torch.device) -> None:
    gc.collect()  # engines hold reference cycles (hooks, optimizer wrappers)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        import ctypes

        try:  # glibc keeps freed heap mapped; the next method's RSS baseline would include this one's leftovers
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def measure_memory(spec: BenchSpec, label: str, batch: dict, device: torch.device, world_size: int) -> dict:
    """One method's memory row, measured with nothing else built; its engine is gone when this returns."""
    meter = PeakMemory(device)
    meter.start()
    before_build = meter.base
    model, engine = _build(spec, label, device, world_size)
    total, trainable = count_parameters(model.backbone)
    units = [getattr(parent, name) for parent, name in checkpoint_units(model)] if spec.activation_checkpointing else []
    # adapters that recompute themselves (Mona, lora_fa) keep their inputs, unless a checkpointed unit holds them
    units += [m for m in model.modules() if isinstance(m, Recompute) and m.enabled]
    _sync(device)
    t0 = time.perf_counter()
    first_step = None  # the first step's time (compilation, under engine.compile): a warm-up or the counted step
    for i in range(spec.warmup):
        _step(engine, batch)
        if i == 0:
            _sync(device)
            first_step = time.perf_counter() - t0
    # On CPU the counted step also runs under LiveTensorPeak: the most tensor bytes alive at once, model state
    # included (on a GPU, max_memory_allocated reads the same from the device).
    held = [t for ts in model_state_tensors(engine.module, engine.optimizer).values() for t in ts]
    live = LiveTensorPeak([*held, *model.buffers()], device) if device.type == "cpu" else contextlib.nullcontext()
    with live:
        saved, loss = saved_activation_bytes(lambda: engine(batch)["loss"], exclude=list(model.parameters()),
                                             checkpointed=units)
        engine.backward(loss)
        engine.step()
        del loss
    if first_step is None:
        _sync(device)
        first_step = time.perf_counter() - t0
    first_step = all_reduce_max(first_step)
    if device.type == "cuda":  # one more step: its own peak, with the optimizer state in place from the start
        meter.start()
        _step(engine, batch)
    # On CPU the counted step is the only one needed (the exact accounting reads the state after it): a paper-size
    # detector step takes 14-54 s (measured) there. VmHWM runs from before the build, over the build and every step.
    transient = meter.stop()  # CPU: peak RSS since before the build, above the RSS then
    state = model_state_bytes(engine.module, engine.optimizer)
    if device.type == "cuda":
        peak = meter.absolute - before_build  # everything this method allocated, from before it was built
    else:
        peak = state["total"] + saved  # the exact accounting; RSS is reported beside it
    head_trainable = count_parameters(model)[1] - trainable
    if spec.engine == "fsdp":
        estimate = fsdp_model_state_estimate(trainable + head_trainable, total - trainable, world_size)
    else:
        estimate = zero_model_state_estimate(trainable + head_trainable, total - trainable, spec.precision,
                                             spec.zero_stage if spec.engine != "ddp" else 0, world_size)
    row = {
        "method": label,
        "trainable": trainable,
        "total_params": total,
        "peak_mem_bytes": all_reduce_max(int(peak)),
        "saved_activation_bytes": all_reduce_max(int(saved)),
        "model_state_bytes": all_reduce_max(int(state["total"])),
        "model_state_breakdown": state,
        "model_state_estimate_bytes": estimate["total"],
        "model_state_estimate_breakdown": estimate,
        "rss_peak_bytes": all_reduce_max(int(transient)) if device.type == "cpu" else None,
        "live_peak_bytes": all_reduce_max(int(live.peak)) if device.type == "cpu" else None,
        "first_step_s": first_step,
    }
    engine.release()
    del model, engine
    _free(device)
    return row


def run_bench(spec: BenchSpec, device: torch.device, world_size: int = 1) -> list[dict]:
    batch = make_batch(spec, device)
    runs = [MethodRun(label, None, measure_memory(spec, label, batch, device, world_size)) for label in spec.labels()]
    for r in runs if spec.steps > 0 else []:  # steps 0: memory only (a paper-size detector on a CPU)
        r.engine = _build(spec, r.label, device, world_size)[1]

    for i in range(spec.steps):  # interleaved timing, order rotated each round
        for r in runs[i % len(runs):] + runs[: i % len(runs)]:
            _sync(device)
            t0 = time.perf_counter()
            _step(r.engine, batch)
            _sync(device)
            r.times.append(all_reduce_max(time.perf_counter() - t0))

    rows = []
    for r in runs:
        ts = sorted(r.times)
        median = statistics.median(ts) if ts else None
        r.row.update(
            step_time_s=median,
            step_time_p10_s=ts[int(0.1 * (len(ts) - 1))] if ts else None,
            step_time_p90_s=ts[math.ceil(0.9 * (len(ts) - 1))] if ts else None,
            images_per_s=spec.batch_size * world_size / median if ts else None,
        )
        rows.append(r.row)
        if r.engine is not None:
            r.engine.release()
            r.engine = None
    _free(device)
    add_ratios(rows)
    if spec.inference:
        from .inference import add_inference, measure_inference

        add_inference(rows, measure_inference(spec, batch, device, world_size))
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each method's peak memory, saved activations and step time as a ratio to `full` and to `fixed`; a compiled
    run's step time also as a ratio to its eager run (`time_vs_eager`)."""
    by = {r["method"]: r for r in rows}
    for ref in ("full", "fixed"):
        if ref not in by:
            continue
        for r in rows:
            for key, short in (("peak_mem_bytes", "peak"), ("step_time_s", "time"), ("saved_activation_bytes", "saved"),
                               ("live_peak_bytes", "live")):
                base = by[ref].get(key)
                r[f"{short}_vs_{ref}"] = r[key] / base if base and r.get(key) is not None else None
    for r in rows:  # a compiled run against the same method eager, measured side by side
        eager = by.get(r["method"].removesuffix(COMPILED)) if r["method"].endswith(COMPILED) else None
        r["time_vs_eager"] = (r["step_time_s"] / eager["step_time_s"]
                              if eager and r["step_time_s"] is not None and eager["step_time_s"] else None)
