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
    """Shows "(default: X)" as ArgumentDefaultsHelpFormatter does, except on required flags, None defaults and the
    empty list of a repeatable flag, where it would only say "None" or "[]" (their help says what leaving them out
    means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


CHECKPOINT_HELP = ("latest: the newest complete checkpoint under the config's output_dir (as --resume auto finds "
                   "it); or a step directory <output_dir>/checkpoints/step-N, a checkpoints directory or an "
                   "output_dir")


def add_run_arguments(p: argparse.ArgumentParser, config_help: str, checkpoint: bool = True) -> None:
    """The flags every command on a run's config shares (train, eval, predict, export): --config, --set, and
    --checkpoint unless `checkpoint` is False; the deepspeed launcher's --local_rank is accepted and ignored."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML (repeatable), e.g. --set train.max_steps=20")
    if checkpoint:
        p.add_argument("--checkpoint", default="latest", metavar="latest|DIR", help=CHECKPOINT_HELP)
    # The deepspeed launcher appends --local_rank=N; ranks come from mona_dist.distributed instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


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
