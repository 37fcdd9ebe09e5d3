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

    The wrapper inserts `_checkpoint_wrapped_module.` into parameter names; `save_adapter` strips it. Adapters inside
    a unit that recompute themselves (Mona keeps only its input) stop doing so: the unit's checkpoint recomputes
    them, and a nested checkpoint would keep each Mona's input alive beside the unit's.
    """
    from mona_dist.adapters.blocks import Recompute

    if units is None:
        from mona_dist.models import checkpoint_units

        units = checkpoint_units(model)
    for parent, attr in units:
        unit = getattr(parent, attr)
        for m in unit.modules():
            if isinstance(m, Recompute):
                m.enabled = False
        setattr(parent, attr, checkpoint_wrapper(unit, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return len(units)
