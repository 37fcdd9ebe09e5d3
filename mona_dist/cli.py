"""`mona-dist` command line: each sub-command lives beside the code it drives.

A module listed here defines `register(subparsers)`, adding its commands with `set_defaults(func=...)`.
Modules import only argparse at top level so that `mona-dist --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "mona_dist.train.cli",  # train
    "mona_dist.models.cli",  # params, convert
    "mona_dist.data.cli",  # shards, bench-data
    "mona_dist.bench.cli",  # bench
    "mona_dist.config.cli",  # recipes
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mona-dist", description=__doc__.splitlines()[0])
    # `deepspeed --module mona_dist.cli ...` passes --local_rank=N before the sub-command (and
    # `deepspeed launch/train.py` after it); ranks come from mona_dist.distributed, so it is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mona_dist import distributed

    distributed.hide_cuda_under_cpu_accelerator()  # before anything starts CUDA: a CPU DeepSpeed run stays on the CPU
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as err:
        # Bad input: one line that names what was wrong, no traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mona-dist {args.command}: error: {msg}", file=sys.stderr)
        distributed.leave(wait_for_peers=False)  # the other ranks may never get here: no barrier
        return 2
    # Every command that joined a process group leaves it on every rank before the interpreter shuts down: see
    # distributed.finish (a rank that exits inside the group can abort in gloo's teardown).
    distributed.leave(wait_for_peers=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
