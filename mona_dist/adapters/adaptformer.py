"""AdaptFormer (Chen et al., NeurIPS 2022) as the Mona paper ran it: one bottleneck per block, parallel to the MLP,
fed the post-attention stream, no internal skip, output scaled by a fixed 0.1:

    x = x + drop_path(mlp(norm2(x))) + 0.1 * up(dropout(gelu(down(x))))

Parameters per block: 129*C + 64.
"""

from __future__ import annotations

from torch import nn

from .adapter import Adapter
from .blocks import iter_blocks, make_petl


def apply_adaptformer(trunk: nn.Module, hidden: int = 64, dropout: float = 0.1, scale: float = 0.1):
    for _, blk, dim in iter_blocks(trunk):
        make_petl(trunk, blk)
        blk.mlp_parallel = Adapter(dim, hidden, dropout, skip=False, scale=scale)
