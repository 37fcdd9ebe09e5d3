"""`mona-dist` command line: each sub-command lives beside the code it drives.

A module listed here defines `register(subparsers)`, adding its commands with `set_defaults(func=...)`; every flag
has a help text and shows its default (`DefaultsFormatter` of mona_dist/cli_args.py, or
argparse.ArgumentDefaultsHelpFormatter; tests/test_cli_help.py checks). Modules import only argparse and
mona_dist.cli_args (a leaf) at top level, never this dispatcher, so that `mona-dist --help` stays fast.
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
    from mona_dist import distributed, gpu_binding

    gpu_binding.hide_cuda_under_cpu_accelerator()  # before anything starts CUDA: a CPU DeepSpeed run stays on the CPU
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as err:
        # Bad input: one line that names what was wrong, no traceback.
        from mona_dist.teardown import stop_workers

        stop_workers()  # a loader's workers would keep the exit waiting forever (teardown.report_failure)
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mona-dist {args.command}: error: {msg}", file=sys.stderr)
        distributed.leave(wait_for_peers=False)  # the other ranks may never get here: no barrier
        return 2
    except (Exception, KeyboardInterrupt) as err:
        # Anything else mid-run (a bad label, a full disk, Ctrl-C, a library's error): the workers stopped, one line,
        # the traceback in a file; the other ranks' collectives fail when this process is gone, so they end too.
        from mona_dist.teardown import report_failure

        code = report_failure(f"mona-dist {args.command}", err)
        distributed.leave(wait_for_peers=False)
        return code
    if code:  # (train has imported mona_dist.train by now: no start-up cost for the other commands)
        from mona_dist.train.signals import EX_TEMPFAIL, ignore_preemption_signals

        if code == EX_TEMPFAIL:  # pre-empted, checkpoint saved: a late signal must not turn exit 75 into a kill
            ignore_preemption_signals()  # before the barrier in leave(): no rank exits before every rank ignores
    # Every command that joined a process group leaves it on every rank before the interpreter shuts down: see
    # distributed.finish (a rank that exits inside the group can abort in gloo's teardown).
    distributed.leave(wait_for_peers=True)
    return code


def run(argv: list[str] | None = None) -> None:
    """The `mona-dist` command: `main(argv)`, then the end of the process through `teardown.exit_process`, so that a
    rank whose gloo workers outlive the run does not abort in the interpreter's shutdown."""
    from mona_dist.teardown import exit_process

    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors and --help
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    exit_process(code)


if __name__ == "__main__":
    run()
