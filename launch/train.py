#!/usr/bin/env python
"""Thin entry for launchers that start a script (`deepspeed --num_gpus N launch/train.py --config ...`,
hostfile launches, `python -m torch.distributed.run launch/train.py ...`): the same code as `mona-dist train`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mona_dist.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
