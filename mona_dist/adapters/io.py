"""Parameter counts and adapter-only files.

An adapter file is a safetensors file holding every parameter with `requires_grad` (the method's modules, and a
task's head when saved from a whole model), named as in `state_dict()`, plus string metadata (method, backbone...).
It loads onto a freshly built model of the same kind; nothing in it can run code. Loading checks every tensor:
floating point (int8 or bool weights are a foreign or corrupt file, not something to cast) and finite.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

# Prefixes that wrappers put in front of parameter names and that state_dict() does not show.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """The state_dict() name of a parameter found through named_parameters() on a possibly wrapped model."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves a 0-element placeholder and keeps the true count


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; correct under ZeRO-3 partitioning too."""
    total = trainable = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {clean_name(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}


def copy_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Copy `tensors` into `model`'s trainable parameters, matched by state_dict name (wrapper prefixes removed).

    The one place that matches saved trainable tensors to a live, possibly wrapped, model: adapter files and the
    torch engines' checkpoints both go through it. Names or shapes that do not match are a one-line ValueError
    naming `source` (and ending with `hint`); nothing is copied then.
    """
    params = {clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        what = f"unexpected {unexpected[:3]}" if unexpected else f"missing {missing[:3]}"
        raise ValueError(f"{source} does not fit this model ({len(unexpected)} unexpected, {len(missing)} missing "
                         f"keys: {what}){hint}")
    for name, t in tensors.items():
        if params[name].shape != t.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, the model has {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


def save_adapter(model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, **metadata: str) -> Path:
    """Write the trainable tensors of `model` (or the given name -> tensor mapping, e.g. an engine's
    `trainable_weights()`) to one safetensors file (ZeRO-3: gather first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = model if isinstance(model, Mapping) else trainable_state_dict(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    if not tensors:
        raise ValueError("nothing to save: the model has no trainable parameters")
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})
    return path


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load an adapter file into `model`'s trainable parameters; return the file's metadata.

    Every tensor in the file must match a trainable parameter by name and shape, and every trainable parameter
    must be in the file; anything else is an error naming a key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors adapter file ({err})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: {name} is {str(t.dtype).removeprefix('torch.')}, not a floating-point weight "
                             f"(a foreign or corrupt adapter file)")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{path}: {name} holds {bad} non-finite value(s) (NaN/inf); the run that saved it "
                             f"diverged, or the file is corrupt")
    method = f" {metadata['method']!r}" if metadata.get("method") else ""
    copy_trainable(model, tensors, str(path), hint=f"; was it saved from the same backbone and method{method}?")
    return metadata
