"""The model's buffers in a checkpoint (`buffers.pt`): BatchNorm running statistics of the heads and the like.

The ddp and fairscale engines save trainable weights only, so without this file a restored UperNet or Cascade
head would evaluate with fresh statistics; DeepSpeed and FSDP save buffers with the module, and loading them again
from here gives the same values.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mona_dist.adapters.io import clean_name
from mona_dist.serialization import safe_torch_load

BUFFERS = "buffers.pt"


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers `state_dict()` holds, by their state_dict name (running statistics, counters, index tables)."""
    out = {}
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[clean_name(f"{prefix}.{name}" if prefix else name)] = buf
    return out


def load_buffers(path: Path, model: torch.nn.Module) -> None:
    """Copy `path`/buffers.pt into the model's buffers (same names and shapes); checkpoints from before it was
    written have none, and keep the engine's own state (DeepSpeed and FSDP save buffers with the module)."""
    file = path / BUFFERS
    if not file.is_file():
        return
    saved, live = safe_torch_load(file), persistent_buffers(model)
    if not isinstance(saved, dict) or set(saved) != set(live):
        odd = sorted(set(saved) ^ set(live)) if isinstance(saved, dict) else ["?"]
        raise ValueError(f"checkpoint {file} does not fit this model's buffers ({len(odd)} names differ, e.g. "
                         f"{odd[0]})")
    with torch.no_grad():
        for name, buf in live.items():
            if buf.shape != saved[name].shape:
                raise ValueError(f"checkpoint {file}: buffer {name} has shape {tuple(saved[name].shape)}, the "
                                 f"model has {tuple(buf.shape)}")
            buf.copy_(saved[name])
