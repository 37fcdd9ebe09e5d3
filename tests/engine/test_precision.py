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


# ---- DeepSpeed's bf16: the parameters are cast, the rest of the model follows (engine/precision.py) ----------


def test_batchnorm_with_bf16_weights_computes_in_fp32():
    """bf16 weight and bias beside fp32 statistics: after match_engine_dtype the norm runs torch's mixed kernel,
    equals an fp32 BatchNorm holding the same (bf16-rounded) weights, updates fp32 statistics and keeps its state
    dict names; gradients reach the bf16 parameters."""
    from torch import nn

    from mona_dist.data.preprocess import DataPreprocessor
    from mona_dist.engine.precision import match_engine_dtype

    torch.manual_seed(0)
    model = nn.Sequential(DataPreprocessor(), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    model[2].weight.data.uniform_(0.5, 1.5)
    reference = nn.BatchNorm2d(8)
    reference.load_state_dict(model[2].state_dict())
    keys = list(model.state_dict())
    for p in model.parameters():  # what DeepSpeed 0.19 does: parameters only
        p.data = p.data.to(torch.bfloat16)
    reference.weight.data = model[2].weight.data.float()
    reference.bias.data = model[2].bias.data.float()
    x = torch.randn(4, 8, 6, 6).to(torch.bfloat16)
    with pytest.raises(RuntimeError):  # the combination DeepSpeed leaves behind
        model[2](x)
    match_engine_dtype(model, torch.bfloat16)
    out = model[2](x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference(x.float()), atol=2e-2)
    norm = model[2]
    assert norm.running_mean.dtype == norm.running_var.dtype == torch.float32
    assert torch.allclose(norm.running_var, reference.running_var, atol=1e-3)  # updated like the fp32 norm's
    assert list(model.state_dict()) == keys and isinstance(norm, nn.BatchNorm2d)
    assert norm._parameters["weight"].dtype == torch.bfloat16  # the parameter itself is untouched
    out.float().sum().backward()
    assert norm._parameters["weight"].grad.dtype == torch.bfloat16
    assert model[0].output_dtype == torch.bfloat16
    match_engine_dtype(model, torch.bfloat16)  # idempotent
    assert type(norm).__mro__.count(nn.BatchNorm2d) == 1 and type(norm).__bases__ == (nn.BatchNorm2d,)


def test_other_float_buffers_follow_the_engine_dtype():
    from torch import nn

    from mona_dist.engine.precision import match_engine_dtype

    model = nn.Linear(2, 2)
    model.register_buffer("mask", torch.zeros(2))
    model.register_buffer("index", torch.arange(2))
    match_engine_dtype(model, torch.float16)
    assert model.mask.dtype == torch.float16 and model.index.dtype == torch.int64
