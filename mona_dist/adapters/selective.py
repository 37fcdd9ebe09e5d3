"""Methods that add nothing and only choose which existing parameters train.

- full: everything.  fixed: nothing (the backbone is frozen; heads still train).
- bitfit: every parameter whose name contains "bias" (relative_position_bias_table included, as in the paper).
- norm (NormTuning): every parameter whose name contains "norm" (block norms, patch-embed norm, patch-merging
  norms, output norms).
- partial1 (Partial-1): only the last block of the last stage.
"""

from __future__ import annotations

from torch import nn

from .blocks import iter_blocks


def _train_named(model: nn.Module, word: str) -> None:
    for name, p in model.named_parameters():
        if word in name:
            p.requires_grad_(True)


def apply_full(model: nn.Module) -> None:
    model.requires_grad_(True)


def apply_fixed(model: nn.Module) -> None:
    model.requires_grad_(False)


def apply_bitfit(model: nn.Module) -> None:
    _train_named(model, "bias")


def apply_norm(model: nn.Module) -> None:
    _train_named(model, "norm")


def apply_partial1(model: nn.Module) -> None:
    *_, (_, last, _) = iter_blocks(getattr(model, "trunk", model))
    last.requires_grad_(True)
