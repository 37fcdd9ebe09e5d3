"""Parameter counts and adapter-only files.

An adapter file is a safetensors file holding every parameter with `requires_grad` (the method's modules, and a
task's head when saved from a whole model), named as in `state_dict()`, plus string metadata that describes it:

    format            mona-dist-adapter/2
    method            mona                          method_options  {"dropout": 0.1, "inner_dim": 64, ...} (JSON,
    backbone          swin_large_patch4_window7_224                   every option, defaults filled in)
    out_indices       [0, 1, 2, 3] (JSON)           swin_arithmetic official
    backbone_prefix   "backbone." (where the backbone's tensors sit in the file; "" for a bare backbone)
    task, step, pretrained   when the trainer saved it     mona_dist   the package version that wrote it

It loads onto a freshly built model of the same kind; nothing in it can run code. Loading checks the metadata
against the model (another method, backbone, options or outputs is one line naming both values; files written
before the metadata existed load unchecked) and every tensor: floating point (int8 or bool weights are a foreign or
corrupt file, not something to cast) and finite. `mona_dist.models.build_backbone_from_adapter` builds the backbone
a file describes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

ADAPTER_FORMAT = "mona-dist-adapter/2"
# Metadata that must equal the model's for the tensors to mean what they meant when saved.
CHECKED_KEYS = ("backbone", "method", "method_options", "out_indices")
# Method options that choose how a method computes, not what its tensors mean (Mona's recomputation and merged
# filters): a file neither records nor checks them, so it loads whichever way it was trained.
RUNTIME_OPTIONS = ("recompute", "fused")

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


def find_backbone(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(state_dict prefix, module) of the first mona_dist Backbone with a method in `model` (found by its
    attributes: this package's adapters do not import its models)."""
    for name, m in model.named_modules():
        if getattr(m, "method", None) is not None and hasattr(m, "trunk") and hasattr(m, "out_indices"):
            name = clean_name(name)
            return (f"{name}." if name else ""), m
    return None


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=list)  # tuples and lists alike


def backbone_metadata(model: nn.Module) -> dict[str, str]:
    """What an adapter file records of the backbone inside `model`: {} when it holds none."""
    found = find_backbone(model)
    if found is None:
        return {}
    prefix, bb = found
    meta = {"method": bb.method, "backbone": bb.name, "out_indices": _json(list(bb.out_indices)),
            "swin_arithmetic": bb.swin_arithmetic, "backbone_prefix": prefix}
    if getattr(bb, "method_options", None) is not None:
        meta["method_options"] = _json({k: v for k, v in bb.method_options.items() if k not in RUNTIME_OPTIONS})
    return meta


def adapter_metadata(model: nn.Module, **extra: Any) -> dict[str, str]:
    """The metadata `save_adapter` writes for `model`, plus `extra` (task=, step=, pretrained=; None is left out).
    The trainer computes it once from the plain model and passes it with the engine's gathered tensors."""
    from .. import __version__

    meta = {"format": ADAPTER_FORMAT, "mona_dist": __version__, **backbone_metadata(model)}
    meta.update({k: str(v) for k, v in extra.items() if v is not None})
    return meta


def save_adapter(model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, **metadata: Any) -> Path:
    """Write the trainable tensors of `model` (or the given name -> tensor mapping, e.g. an engine's
    `trainable_weights()`) to one safetensors file (ZeRO-3: gather first). From a model, the file describes it
    (`adapter_metadata`); `metadata` adds to or overrides that (from a mapping, pass `**adapter_metadata(model)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, Mapping):
        source, described = model, {}
    else:
        source, described = trainable_state_dict(model), adapter_metadata(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    if not tensors:
        raise ValueError("nothing to save: the model has no trainable parameters")
    meta = {**described, **{k: str(v) for k, v in metadata.items() if v is not None}}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of an adapter file, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors adapter file ({err})") from None


def check_adapter_metadata(model: nn.Module, metadata: Mapping[str, str], source: str) -> None:
    """One ValueError line when `metadata` says the file was saved from another backbone, method, options or
    outputs than `model` has. Keys the file lacks (older files) or the model cannot tell are not checked."""
    ours = backbone_metadata(model)
    for key in CHECKED_KEYS:
        if key not in metadata or key not in ours:
            continue
        theirs, mine = metadata[key], ours[key]
        if key in ("method_options", "out_indices"):
            try:
                theirs = json.loads(theirs)
                if key == "method_options" and isinstance(theirs, dict):
                    theirs = {k: v for k, v in theirs.items() if k not in RUNTIME_OPTIONS}
                theirs = _json(theirs)
            except json.JSONDecodeError:
                raise ValueError(f"{source}: metadata {key} is not JSON: {metadata[key]!r}") from None
        if theirs != mine:
            raise ValueError(f"{source} was saved from {key} {theirs}, this model has {key} {mine}")


def load_adapter(model: nn.Module, path: str | Path, *, check: bool = True,
                 prefix: str | None = None) -> dict[str, str]:
    """Load an adapter file into `model`'s trainable parameters; return the file's metadata.

    With `check`, the file's metadata must agree with `model` (module docstring). Every tensor in the file must
    match a trainable parameter by name and shape, and every trainable parameter must be in the file; anything
    else is an error naming a key. `prefix`: load only the file's tensors under it, with it removed (a bare
    backbone from a whole task model's file: its `backbone_prefix`).
    """
    path = Path(path)
    metadata = read_adapter_metadata(path)
    if check:
        check_adapter_metadata(model, metadata, str(path))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors adapter file ({err})") from None
    if prefix:
        tensors = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
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
