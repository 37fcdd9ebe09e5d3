"""`mona-dist recipes [--check]`: the official recipes' values against the shipped configs."""

from __future__ import annotations

import argparse
import sys

from mona_dist.cli_args import DefaultsFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="print the official recipe values next to the shipped configs' "
                                       "(docs/recipes.md)",
                       description=__doc__, formatter_class=DefaultsFormatter)
    p.add_argument("--check", action="store_true", help="exit 1, listing them, when a shipped value differs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mona_dist.config.recipes import differences, table

    if args.check:
        diffs = differences()
        for line in diffs:
            print(line, file=sys.stderr)
        if not diffs:  # silence read as "nothing was checked"
            from mona_dist.config.recipes import RECIPES, rows

            configs = {name for r in RECIPES for name in (*r.configs.values(), *r.variants)}
            print(f"recipes: all {sum(len(rows(r)) for r in RECIPES)} official values match the {len(configs)} "
                  f"shipped configs")
        return 1 if diffs else 0
    print(table(), end="")
    return 0
