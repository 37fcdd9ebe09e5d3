"""`mona-dist bench`: training memory and time, and inference latency, of methods on one backbone, side by side,
as JSON, Markdown, PNG and TensorBoard. Sizes are height x width (800x1333 is mmdet's img_scale=(1333, 800))."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mona_dist.cli_args import DefaultsFormatter

DEFAULT_METHODS = "full,fixed,mona,mona_hw,e3va,lora,adapter,adaptformer,lorand,bitfit"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare training memory and time, and inference latency, of methods side by side",
                       description=__doc__, formatter_class=DefaultsFormatter)
    p.add_argument("--backbone", default=None,
                   help="default: the task's paper backbone (swin_large_patch4_window7_224 for voc, "
                        "swin_base_patch4_window7_224 otherwise)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated; options after a colon, more after commas, e.g. "
                        "e3va:lora_fa=true,rank=4 or mona:recompute=false,fused=false (today's Mona before issue 27)")
    p.add_argument("--task", choices=["cls", "seg", "coco", "voc"], default="cls",
                   help="cls: linear head; seg: semantic-FPN head; coco: the coco task's mmdet Cascade Mask R-CNN; "
                        "voc: the voc task's mmdet RetinaNet (Swin only)")
    p.add_argument("--batch-size", type=int, default=2, help="images per rank and step")
    p.add_argument("--img-size", type=image_size, default=None, metavar="SIDE|HxW",
                   help="a side, or height x width; default: 224 (cls, seg), 800x1333 (coco), 600x1000 (voc)")
    p.add_argument("--objects", type=int, default=4,
                   help="coco, voc: ground-truth objects per image (random boxes; coco also their masks)")
    p.add_argument("--steps", type=int, default=10,
                   help="timed training steps per method, and timed eval forwards (0: memory only)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (and eval forwards) before timing")
    p.add_argument("--no-inference", dest="inference", action="store_false",
                   help="skip the eval-mode latency and images/s per method (LoRA also merged into qkv); "
                        "without it, timed: %(default)s")
    p.add_argument("--engine", choices=["ddp", "deepspeed", "fairscale", "fsdp"], default="ddp",
                   help="the training engine every method runs under")
    p.add_argument("--zero", type=int, default=0, help="ZeRO stage (deepspeed 0-3, fairscale 1-2)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="checkpoint every block in training")
    p.add_argument("--compile", action="store_true",
                   help="also run every method under engine.compile (torch.compile per block), timed side by side")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--out", type=Path, default=Path("runs/bench"),
                   help="directory for bench.json, bench_meta.json, bench.md, bench.png and tb/")
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=bench)


def bench(args: argparse.Namespace) -> int:
    import torch

    from ..distributed import init_distributed
    from .report import write_outputs
    from .runner import TASK_DEFAULTS, BenchSpec, run_bench

    from ..adapters import METHODS, check_method_options
    from .runner import parse_method, split_methods

    for label in split_methods(args.methods):  # every method's options, before anything is built
        method, options = parse_method(label)
        METHODS.get(method)
        options.pop("swin_arithmetic", None)  # a backbone option, checked by build_backbone
        check_method_options(method, options)
    if args.objects < 1:
        raise ValueError(f"--objects: expected at least 1 object per image, got {args.objects}")
    device_kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    from ..config.schema import EngineConfig, combination_errors

    errors = combination_errors(EngineConfig(name=args.engine, zero_stage=args.zero, compile=args.compile))
    if errors:  # the training config's rules, named by the flags that set them
        key, why = errors[0]
        flag = {"engine.zero_stage": "--zero", "engine.compile": "--compile"}.get(key, key)
        raise ValueError(f"{flag}: {why}")
    dist = init_distributed()
    if args.engine in ("fsdp", "fairscale") and not torch.distributed.is_initialized():
        # these engines shard over a process group, even a single process's (a private in-memory one)
        torch.distributed.init_process_group("nccl" if device_kind == "cuda" else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    # init_distributed picked this rank's GPU; with one visible GPU per task that is cuda:0, not cuda:local_rank.
    device = torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda" else torch.device("cpu")
    backbone, hw, classes = TASK_DEFAULTS[args.task]
    spec = BenchSpec(
        backbone=args.backbone or backbone, methods=split_methods(args.methods), task=args.task,
        batch_size=args.batch_size, img_size=args.img_size or hw, steps=args.steps, warmup=args.warmup,
        num_classes=classes, objects=args.objects,
        engine=args.engine, zero_stage=args.zero, activation_checkpointing=args.activation_checkpointing,
        precision=args.precision or ("bf16" if device_kind == "cuda" else "fp32"), compile=args.compile,
        inference=args.inference,
    )
    rows = run_bench(spec, device, world_size=dist.world_size)
    if dist.rank == 0:
        meta = {**vars(spec), "device": device.type, "world_size": dist.world_size,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
                "command": "mona-dist " + " ".join(shlex.quote(a) for a in sys.argv[1:] if "local_rank" not in a)}
        print(write_outputs(rows, meta, args.out))
        print(f"wrote {args.out}/bench.json, bench.md, bench.png, tb/")
    return 0


def image_size(text: str) -> int | tuple[int, int]:
    """"224" -> 224; "800x1333" (height x width, as torch shapes) -> (800, 1333)."""
    try:
        sides = [int(v) for v in text.lower().split("x")]
        if len(sides) not in (1, 2) or min(sides) <= 0:
            raise ValueError
        return sides[0] if len(sides) == 1 else (sides[0], sides[1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a side or HxW (height x width) such as 800x1333, got {text!r}") from None


def _cpu_name() -> str:
    import os

    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "CPU"
    return f"{model} ({os.cpu_count()} cores)"
