"""Per-block activation checkpointing, non-reentrant.

The reentrant variant (`use_reentrant=True`, also `deepspeed.checkpointing.checkpoint`) only back-propagates into a
checkpointed block when one of its *inputs* requires grad. Behind a frozen stem no input does, so every adapter
inside the block silently gets no gradient — the official Mona code has exactly this setup. The non-reentrant
variant tracks the parameters used inside the block and has no such blind spot.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper


def enable_activation_checkpointing(model: nn.Module, units: list[tuple[nn.Module, str]] | None = None) -> int:
    """Wrap each `(parent, attr)` unit (default: `mona_dist.models.checkpoint_units(model)`); returns how many.

    The wrapper inserts `_checkpoint_wrapped_module.` into parameter names; `save_adapter` strips it.
    """
    if units is None:
        from mona_dist.models import checkpoint_units

        units = checkpoint_units(model)
    for parent, attr in units:
        setattr(parent, attr, checkpoint_wrapper(getattr(parent, attr), checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return len(units)
