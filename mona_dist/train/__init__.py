"""The training loop (`train(cfg, resume)`), checkpoints with atomic `latest`, pre-emption, `mona-dist train`."""

from mona_dist.train.checkpoint import checkpoint_root, load_checkpoint, resolve_resume, save_checkpoint
from mona_dist.train.loop import EX_NONFINITE, train
from mona_dist.train.signals import EX_TEMPFAIL, PreemptionFlag

__all__ = ["EX_NONFINITE", "EX_TEMPFAIL", "PreemptionFlag", "checkpoint_root", "load_checkpoint", "resolve_resume",
           "save_checkpoint", "train"]
