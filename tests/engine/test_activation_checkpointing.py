"""Non-reentrant activation checkpointing keeps every adapter's gradient behind a frozen stem; reentrant loses them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from mona_dist.engine import enable_activation_checkpointing
from mona_dist.models import build_backbone, checkpoint_units


class Block(nn.Module):
    """A frozen layer plus a trainable residual adapter, like a Swin block under Mona."""

    def __init__(self, dim: int):
        super().__init__()
        self.frozen = nn.Linear(dim, dim).requires_grad_(False)
        self.adapter = nn.Linear(dim, dim)

    def forward(self, x):
        x = x + self.frozen(x)
        return x + self.adapter(x)


class FrozenStemNet(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3):
        super().__init__()
        self.stem = nn.Linear(4, dim).requires_grad_(False)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.stem(x)).pow(2).mean()


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_non_reentrant_keeps_adapter_grads_and_reentrant_loses_them():
    torch.manual_seed(0)
    ref, x = FrozenStemNet(), torch.randn(5, 4)
    ours, reentrant = copy.deepcopy(ref), copy.deepcopy(ref)
    ref(x).backward()

    n = enable_activation_checkpointing(ours, [(ours.blocks, str(i)) for i in range(3)])
    assert n == 3 and all("CheckpointWrapper" in type(b).__name__ for b in ours.blocks)
    ours(x).backward()
    expected = adapter_grads(ref)
    got = adapter_grads(ours)
    assert got.keys() == expected.keys() and len(got) == 6
    for name, grad in got.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0)

    # The pitfall this guards against: reentrant checkpointing sees no input requiring grad behind the frozen stem.
    for i in range(3):
        reentrant.blocks[i] = checkpoint_wrapper(reentrant.blocks[i], checkpoint_impl=CheckpointImpl.REENTRANT)
    with pytest.warns(UserWarning, match="requires_grad"):
        loss = reentrant(x)
    assert not loss.requires_grad  # nothing to backpropagate: every adapter would silently get no gradient
    assert all(g is None for g in adapter_grads(reentrant).values())


def test_swin_mona_every_adapter_gets_its_gradient():
    """The real backbone: units from `checkpoint_units`, Mona everywhere, frozen patch embed (the official setup)."""
    torch.manual_seed(0)
    ref = build_backbone("swin_nano_patch4_window7", "mona").eval()  # eval: no dropout, same numbers both ways
    ours = copy.deepcopy(ref)
    images = torch.randn(2, 3, 32, 32)
    sum(f.float().pow(2).mean() for f in ref(images)).backward()
    n = enable_activation_checkpointing(ours)
    assert n == len(checkpoint_units(ref)) == 8  # depths 2/2/2/2
    sum(f.float().pow(2).mean() for f in ours(images)).backward()
    expected, got = adapter_grads(ref), adapter_grads(ours)
    assert got.keys() == expected.keys()
    assert sum(k.endswith(".gammax") for k in got) == 16  # two Monas in each of the 8 blocks, all trainable
    assert not any("patch_embed" in k for k in got)  # the stem is frozen: reentrant would lose everything
    for name, grad in got.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)


def test_checkpointed_blocks_keep_no_mona_input_of_their_own():
    """Mona recomputes itself from its input; inside a checkpointed block that nested checkpoint would keep every
    Mona's input alive beside the block's until backward. Activation checkpointing turns it off there."""
    import gc
    import weakref

    from mona_dist.adapters.blocks import Recompute

    torch.manual_seed(0)
    bb = build_backbone("swin_nano_patch4_window7", "mona").train()
    enable_activation_checkpointing(bb)
    inputs = []
    for m in bb.modules():
        if isinstance(m, Recompute):
            m.register_forward_pre_hook(lambda _m, args: inputs.append(weakref.ref(args[1])))
    out = bb(torch.randn(2, 3, 32, 32))
    gc.collect()
    assert len(inputs) == 16 and not any(r() is not None for r in inputs)
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in bb.parameters() if p.requires_grad)
