"""`mona-dist train --config CONFIG [--set key=value ...] [--resume latest|auto|PATH]`."""

from __future__ import annotations

import argparse

from mona_dist.cli_args import DefaultsFormatter, add_run_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a task from a YAML config (any launcher: torchrun, deepspeed, srun)",
                       description=__doc__, formatter_class=DefaultsFormatter)
    add_run_arguments(p, "YAML config (may name a `base:` file)", checkpoint=False)
    p.add_argument("--resume", default=None, metavar="latest|auto|PATH",
                   help="latest: <output_dir>/checkpoints/latest (must exist); auto: latest if present, else fresh; "
                        "or a checkpoint directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mona_dist.config import load_config
    from mona_dist.train.loop import train

    # Every exit code here is reached by all ranks together (stops are all-reduced), so `mona_dist.cli.main`'s
    # finish() barrier after this returns is met by every rank.
    return train(load_config(args.config, args.overrides), resume=args.resume)
