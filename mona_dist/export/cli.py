"""`mona-dist export --config C --checkpoint DIR|latest --out FILE [--merge]`: a run's backbone as one file.

Without --merge: the complete backbone (trunk + method + output norms) in safetensors, which
`build_backbone(name, method, pretrained=FILE, out_indices=..., **method_options)` loads back whole.
With --merge (full, fixed, bitfit, norm, partial1, lora): a plain timm state dict, LoRA folded into qkv,
for `timm.create_model(timm_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=FILE))`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mona_dist.cli_args import DefaultsFormatter, add_run_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's backbone as one safetensors file (complete, or merged for timm)",
                       description=__doc__, formatter_class=DefaultsFormatter)
    add_run_arguments(p, "the run's YAML config (its model section builds the trunk)")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--merge", action="store_true",
                   help="a plain timm state dict (LoRA folded into qkv); only for full, fixed, bitfit, norm, "
                        "partial1, lora (without it: the complete backbone file)")
    p.set_defaults(func=export)


def export(args: argparse.Namespace) -> int:
    from mona_dist.config import load_config

    from torch import nn

    from .merge import MERGEABLE, UNMERGEABLE, timm_load_kwargs, write_backbone, write_timm
    from .run import backbone_from_checkpoint

    cfg = load_config(args.config, args.overrides)
    if args.merge and cfg.model.method not in MERGEABLE:  # before building anything
        why = UNMERGEABLE.get(cfg.model.method, "it adds modules that a timm model does not have")
        raise ValueError(f"--merge: method {cfg.model.method!r} cannot be merged into a plain timm model ({why}); "
                         f"drop --merge for the complete backbone file")
    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: expected a .safetensors file name")
    bb, ckpt, step, model = backbone_from_checkpoint(cfg, args.checkpoint)
    from mona_dist.adapters import check_method_options, method_options

    options = {**method_options(bb.method), **check_method_options(bb.method, dict(cfg.model.method_options))}
    # as the adapter files write them: every option, defaults filled in (tuples as JSON lists)
    source = {"checkpoint": str(ckpt), "step": str(step), "task": cfg.task,
              "method_options": json.dumps(options, default=list, sort_keys=True)}
    if args.merge:
        # a cls run's linear head on the pooled last output is exactly timm's classifier: the file carries it
        head = model.head if cfg.task == "cls" and isinstance(getattr(model, "head", None), nn.Linear) else None
        path, notes = write_timm(bb, args.out, head=head, **source)
        from mona_dist.models import backbone_spec

        spec = backbone_spec(bb.name)
        kwargs = timm_load_kwargs(bb, with_head=head is not None)
        extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        classes = head.out_features if head is not None else 0
        overlay = f"dict(file={str(path)!r}" + (f", num_classes={classes})" if head is not None else ")")
        with_head = ", with the cls head" if head is not None else ""
        print(f"wrote {path}: timm state dict of {bb.name} ({bb.method} merged{with_head}) from {ckpt}")
        print(f"load: timm.create_model({spec.timm_name!r}, pretrained=True, num_classes={classes}, "
              f"pretrained_cfg_overlay={overlay}{extra})")
        if bb.family == "swin" and bb.swin_arithmetic == "official":
            print("features equal this backbone's at input sizes whose every stage is a whole number of windows "
                  "(224 x 224 for window 7; docs/eval-predict-export.md)")
        for note in notes:
            print(f"note: {note}")
    else:
        path = write_backbone(bb, args.out, **source)
        opts = "".join(f", {k}={v!r}" for k, v in cfg.model.method_options.items())
        print(f"wrote {path}: complete {bb.name} backbone ({bb.method}) from {ckpt}")
        print(f"load: build_backbone({bb.name!r}, {bb.method!r}, pretrained={str(path)!r}, "
              f"out_indices={tuple(bb.out_indices)}, swin_arithmetic={bb.swin_arithmetic!r}{opts})")
    return 0
