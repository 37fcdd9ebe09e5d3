"""`mona-dist` command line: each sub-command lives beside the code it drives.

A module listed here defines `register(subparsers)`, adding its commands with `set_defaults(func=...)`; every flag
has a help text and shows its default (`DefaultsFormatter` below, or argparse.ArgumentDefaultsHelpFormatter;
tests/test_cli_help.py checks). Modules import only argparse and this module at top level so that `mona-dist --help`
stays fast.
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
    "mona_dist.infer.cli",  # eval, predict
    "mona_dist.export.cli",  # export
]


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" as ArgumentDefaultsHelpFormatter does, except on required flags and None defaults,
    where it would only say "None" (their help says what leaving them out means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from mona_dist import __version__

    parser = argparse.ArgumentParser(prog="mona-dist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mona-dist {__version__}")
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
