"""`mona-dist params` and `mona-dist convert`."""

from __future__ import annotations

import argparse
import json

from mona_dist.cli_args import DefaultsFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="count a backbone's total and trainable parameters under a method",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--backbone", required=True, help="any timm Swin / ViT name (e.g. swin_large_patch4_window7_224, "
                   "vit_base_patch14_dinov2) or swin_nano_patch4_window7 / vit_nano_patch16")
    p.add_argument("--method", required=True, help="a tuning method, e.g. mona, lora, full")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, value parsed as YAML (repeatable), e.g. --option inner_dim=32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=params)

    c = sub.add_parser("convert", help="turn an official Mona (mmdet/mmseg) checkpoint into a mona-dist file",
                       formatter_class=DefaultsFormatter)
    c.add_argument("src", help="official checkpoint (.pth)")
    c.add_argument("dst", help="output .safetensors")
    c.add_argument("--backbone", default="swin_large_patch4_window7_224", help="the backbone the checkpoint holds")
    c.add_argument("--method", default="mona", help="the method the checkpoint was trained with")
    c.add_argument("--adapter-only", action="store_true", help="write only the method's trainable tensors")
    c.set_defaults(func=convert)


def params(args: argparse.Namespace) -> int:
    import torch

    from ..adapters import METHODS, check_method_options, parse_method_options
    from . import build_backbone, count_parameters

    METHODS.get(args.method)  # unknown: one line listing the valid ones
    options = check_method_options(args.method, parse_method_options(args.option))  # types and bounds, one line
    with torch.device("meta"):  # shapes are all a count needs: Swin-L in a fraction of a second
        bb = build_backbone(args.backbone, args.method, **options)
    total, trainable = count_parameters(bb)
    row = {
        "backbone": args.backbone,
        "method": args.method,
        "total": total,
        "trainable": trainable,
        "trainable_pct": round(100.0 * trainable / total, 4),
    }
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{args.backbone} + {args.method}: {trainable:,} trainable of {total:,} ({row['trainable_pct']:.3f} %)")
    return 0


def convert(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from ..adapters import save_adapter
    from . import build_backbone

    bb = build_backbone(args.backbone, args.method, pretrained=args.src)
    meta = {"format": "mona-dist", "backbone": args.backbone, "method": args.method, "source": str(args.src)}
    if args.adapter_only:
        save_adapter(bb, args.dst, **meta)
    else:
        save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, args.dst, metadata=meta)
    print(f"wrote {args.dst}")
    return 0
