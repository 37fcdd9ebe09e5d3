"""Mixed precision where the engine casts the weights (DeepSpeed bf16/fp16): buffers, norms, the model's input.

DeepSpeed 0.19 casts a model's parameters to bf16/fp16 and leaves its buffers as they were (releases before it
called `module.half()` / `.bfloat16()`, which cast both). A model written for one dtype then meets two, and
`match_engine_dtype` settles each case after the cast, whichever DeepSpeed did it:

- BatchNorm (UperNet's heads): bf16 weights beside fp32 running statistics is a combination no torch kernel takes.
  Norm statistics stay fp32 by design, as mmcv's fp16 and apex's O2 keep them: the statistics are held in fp32
  and the norm reads its weight and bias as fp32 copies of the bf16 parameters (the gradient flows back through
  the cast). That is torch's mixed-type kernel (low-precision input, fp32 affine and statistics), the one autocast
  runs on every BatchNorm; SyncBatchNorm takes it too.
- every other floating buffer follows the parameters' dtype, as `.to(dtype)` would have cast it.
- `DataPreprocessor` (the model's first module) hands the backbone images in the compute dtype.

The torch engines (DDP, fairscale) keep fp32 weights under autocast and need none of this.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mona_dist.data.preprocess import DataPreprocessor


def _fp32(self: nn.Module, name: str) -> torch.Tensor | None:
    p = self._parameters[name]
    return p if p is None or p.dtype == torch.float32 else p.float()


@functools.cache
def fp32_norm_class(base: type[_BatchNorm]) -> type[_BatchNorm]:
    """`base` whose forward sees its weight and bias as fp32. The parameters themselves, their names, their state
    dict entries and what the optimizer holds are unchanged: only attribute reads (`self.weight` in torch's own
    forward) go through the properties, ahead of nn.Module's lookup in `_parameters`."""
    return type(f"Fp32Affine{base.__name__}", (base,), {
        "__doc__": f"{base.__name__} computing with fp32 weight, bias and statistics (mona_dist.engine.precision).",
        "weight": property(lambda self: _fp32(self, "weight")),
        "bias": property(lambda self: _fp32(self, "bias")),
        "fp32_affine": True,
    })


def keep_norm_fp32(module: _BatchNorm) -> None:
    """Make `module` compute in fp32 (idempotent)."""
    if not getattr(module, "fp32_affine", False):
        module.__class__ = fp32_norm_class(type(module))
    for name in ("running_mean", "running_var"):
        buf = getattr(module, name)
        if buf is not None and buf.dtype != torch.float32:
            buf.data = buf.data.float()


def match_engine_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """After the engine cast `model`'s parameters to `dtype`: norms in fp32, other floating buffers in `dtype`,
    the preprocessor's output in `dtype` (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, DataPreprocessor):
            module.output_dtype = dtype
        if isinstance(module, _BatchNorm):
            keep_norm_fp32(module)
            continue
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                buf.data = buf.data.to(dtype)
