"""torch.compile per block (`engine.compile`), as torchtitan compiles a transformer: each unit on its own.

Units, which the backbone names (`Backbone.compile_units`): every transformer block of a block method (Mona's
two modules, LoRA, the adapters live inside it), and under the highway methods (e3va, mona_hw) every highway
adapter plus each block's frozen `taps` pass. Blocks of one shape share their code, so timm's repeated blocks
compile once per stage shape, not once per block.

Order, as in torchtitan: activation checkpointing wraps a block first (the compiled region then holds the
checkpoint, which dynamo traces as one higher-order op), compile wraps that, and the engine wraps last: FSDP
shards the compiled block, so its unshard/reshard hooks run outside the compiled graph. Parameter names gain
`_orig_mod.`, which state_dict names (`adapters.io.clean_name`) and DCP's FQNs both drop, so checkpoints and
adapter files are the same with and without compile.

Two settings work around torch 2.14's compiler (tests/engine/test_fsdp.py fails when either stops being needed):
- `dynamic=False`: with symbolic sizes, inductor's CPU layout code cannot order the strides of Mona's
  channels-last (B, 64, H, W) view ("cannot determine truth value of Relational: 64*s27**2 < 64*s27"). Each input
  shape compiles its own graph instead, which suits fixed-shape training (cls, seg crops); detection's varying
  sizes recompile until the limit below, and run eager beyond it.
- `recompile_limit` >= 64: dynamo counts graphs per code object and every block shares its class's forward: Swin's
  4 stages x (shifted, unshifted) are already its default limit of 8 in training, and evaluation needs as many
  again (past the limit dynamo silently runs eager).
"""

from __future__ import annotations

import torch
from torch import nn

RECOMPILE_LIMIT = 64


def compile_blocks(model: nn.Module) -> int:
    """Compile `model`'s units in place (see the module docstring); returns how many. Nothing is compiled here:
    each unit compiles at its first call, and again for each new input shape until dynamo marks it dynamic."""
    from mona_dist.models import compile_units  # each backbone says what its units are (models/layout.py)

    modules, taps = compile_units(model)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for parent, attr in modules:
        setattr(parent, attr, torch.compile(getattr(parent, attr), dynamic=False))
    for blk in taps:
        # an instance attribute over the method; FSDP wraps it in turn
        blk.taps = torch.compile(blk.taps, dynamic=False)
    return len(modules) + len(taps)
