"""The argparse pieces every sub-command's cli.py shares: the help formatter that shows defaults, and the flags of a
command on a run's config. A leaf: it imports only argparse, so each folder's cli.py takes these from here and never
from the dispatcher (mona_dist/cli.py) that imports them all."""

from __future__ import annotations

import argparse


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
