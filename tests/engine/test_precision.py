"""Mixed precision on the torch engines in one process: bf16 autocast and fp16 with a grad scaler still learn."""

from __future__ import annotations

import pytest
import torch

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine import build_engine

from toy import toy_batch, toy_model


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ddp_single_process_mixed_precision_learns(precision):
    model = toy_model()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    engine = build_engine(model, EngineConfig(name="ddp", precision=precision), OptimConfig(lr=3e-2),
                          micro_batch_size=16)
    assert engine.module is model  # one process: no DDP wrapper
    assert (engine.scaler is not None) == (precision == "fp16")
    losses = []
    for step in range(12):
        loss = engine(toy_batch(step, 0))["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: master weights stay fp32
