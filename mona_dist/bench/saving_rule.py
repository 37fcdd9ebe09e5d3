"""What a torch that kept every linear layer's input for backward would add to each method's saved activations.

Current torch keeps a linear layer's input only for its weight's gradient (`addmm` saves `mat1` only when `mat2`
requires grad), so a frozen layer that gradients pass through keeps nothing. For each method this counts the inputs
of frozen `nn.Linear` layers that are in the autograd graph (the input requires grad) and that nothing else saved:
the bytes a torch without that rule would keep on top. Same models and batch as `mona-dist bench`.

    python -m mona_dist.bench.saving_rule --task coco --img-size 800x1333 --methods bitfit,lora
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from .accounting import _storage_bytes, _storage_key, saved_activation_bytes
from .report import VPETL_MB
from .runner import TASK_DEFAULTS, BenchSpec, _free, build_model, make_batch, parse_method, split_methods


def frozen_linear_inputs(spec: BenchSpec, label: str, batch: dict) -> tuple[int, int]:
    """(saved activation bytes, bytes of frozen linear inputs in the graph not saved otherwise) of one forward."""
    method, opts = parse_method(label)
    torch.manual_seed(spec.seed)
    model = build_model(spec, method, opts).train()
    saved: dict[tuple[str, int], int] = {}
    inputs: dict[tuple[str, int], torch.Tensor] = {}  # held to the end: no address is counted for two tensors

    def frozen_input(module: nn.Linear, args: tuple) -> None:
        x = args[0]
        if isinstance(x, torch.Tensor) and x.requires_grad and not module.weight.requires_grad:
            inputs[_storage_key(x)] = x

    hooks = [m.register_forward_pre_hook(frozen_input) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        total, _ = saved_activation_bytes(lambda: model(batch)["loss"], exclude=model.parameters(), storages=saved)
    finally:
        for h in hooks:
            h.remove()
    return total, sum(_storage_bytes(x) for k, x in inputs.items() if k not in saved)


def main(argv: list[str] | None = None) -> None:
    from .cli import image_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="coco")
    p.add_argument("--backbone", default=None, help="default: the task's paper backbone")
    p.add_argument("--img-size", type=image_size, default=None, metavar="SIDE|HxW")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--methods", default=",".join(VPETL_MB["coco"]), help="default: V-PETL's COCO table's")
    args = p.parse_args(argv)
    backbone, hw, classes = TASK_DEFAULTS[args.task]
    spec = BenchSpec(backbone=args.backbone or backbone, methods=split_methods(args.methods), task=args.task,
                     batch_size=args.batch_size, img_size=args.img_size or hw, steps=0, warmup=0, num_classes=classes)
    batch = make_batch(spec, torch.device("cpu"))
    print("| method | saved MiB | frozen linear inputs not saved MiB |\n|---|---:|---:|")
    for label in spec.methods:
        saved, extra = frozen_linear_inputs(spec, label, batch)
        _free(torch.device("cpu"))  # the method's model and graph, before the next is built
        print(f"| {label} | {saved / 2**20:,.1f} | {extra / 2**20:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
