"""`mona-dist eval` and `mona-dist predict`: a run's checkpoint without training (mona_dist/infer/)."""

from __future__ import annotations

import argparse

_CONFIG_HELP = "the run's YAML config (its config.yaml, or the file it trained from)"


def register(sub: argparse._SubParsersAction) -> None:
    from mona_dist.cli_args import DefaultsFormatter as fmt, add_run_arguments
    p = sub.add_parser("eval", help="a checkpoint's metrics on the val shards, no training (any launcher)",
                       description="The task's metrics on the val shards (keys as in metrics.jsonl, e.g. eval/top1), "
                                   "computed by the trainer's own evaluation; printed as one JSON line, and written "
                                   "to --out/metrics.json and --out/tb. Runs under torchrun, deepspeed and srun.",
                       formatter_class=fmt)
    add_run_arguments(p, _CONFIG_HELP)
    p.add_argument("--shards", default=None, metavar="SPEC",
                   help="val shards to score instead of data.val_shards (an index .json, a brace pattern or a "
                        "directory, as data.val_shards)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write metrics.json and TensorBoard events (tb/) here; nothing is written without it")
    p.set_defaults(func=run_eval_cmd)

    q = sub.add_parser("predict", help="per-image predictions and pictures from a checkpoint (one process)",
                       description="Per image: the prediction (cls: top-5 JSON; seg: label-map PNG at the source "
                                   "size; coco: COCO results JSON with RLE masks; voc: boxes JSON) and a picture "
                                   "(<name>.vis.png). Images go through the task's eval pipeline.",
                       formatter_class=fmt)
    add_run_arguments(q, _CONFIG_HELP)
    q.add_argument("--images", required=True, metavar="DIR|GLOB",
                   help="a directory (its jpg/png/... files) or a glob pattern, e.g. 'photos/*.jpg'")
    q.add_argument("--out", required=True, metavar="DIR", help="where the predictions and pictures go")
    q.add_argument("--score-thresh", type=float, default=0.3,
                   help="coco/voc: smallest score drawn in the pictures (the JSON keeps every detection)")
    q.set_defaults(func=run_predict_cmd)


def run_eval_cmd(args: argparse.Namespace) -> int:
    from mona_dist.infer.evaluate import eval_config, run_eval

    run_eval(eval_config(args.config, args.overrides, args.shards), args.checkpoint, args.out)
    return 0


def run_predict_cmd(args: argparse.Namespace) -> int:
    from mona_dist.config import load_config
    from mona_dist.infer.predict import predict

    if not 0.0 <= args.score_thresh <= 1.0:
        raise ValueError(f"--score-thresh {args.score_thresh}: must be within 0..1")
    predict(load_config(args.config, args.overrides), args.checkpoint, args.images, args.out, args.score_thresh)
    return 0
