"""One shared-memory block per batch between a loader worker and the trainer (a workaround for torch's per-tensor cost).

Why: torch's DataLoader sends every tensor of a batch from the worker through its own shared-memory segment, and
with the default `file_descriptor` strategy each one's descriptor travels through multiprocessing's resource sharer
(a socket connection per tensor). A detection batch of 8 images holds ~40 tensors (image, boxes, labels, masks,
... per image): measured on the CI machine with the coco/voc pipelines reduced to decode + collate, moving the
batches cost as much as decoding the images. `pack` copies every tensor of a batch into one shared block (one
descriptor) and leaves a picklable description of where each one lives; `unpack` rebuilds the same nested
structure in the trainer, every tensor a view into the block (dtype, shape and strides preserved, so channels-last
images stay channels-last). Batches made in the main process (workers=0) are never packed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_ALIGN = 64  # bytes; every tensor starts on a cache line (and on any dtype's alignment)


@dataclass(frozen=True)
class _Slot:
    offset: int  # bytes into the block
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class Packed:
    """A batch in transit: `block` holds every tensor's bytes, `tree` the batch with `_Slot`s in their place."""

    block: torch.Tensor  # uint8, 1-D, in shared memory
    tree: Any

    def pin_memory(self, device: Any = None) -> "Packed":
        """Called by the DataLoader's pin-memory thread: one pinned copy for the whole batch."""
        return Packed(self.block.pin_memory(), self.tree)


def _tensors(obj: Any, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)


def _dense(t: torch.Tensor) -> bool:
    """Does `t` cover exactly its own bytes in some dimension order (contiguous, channels-last, ...)?"""
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def pack(batch: Any) -> Packed:
    """Copy every tensor in `batch` (nested dicts/lists/tuples) into one shared uint8 block."""
    tensors: list[torch.Tensor] = []
    _tensors(batch, tensors)
    layouts, size = [], 0
    for t in tensors:
        t_dense = t if _dense(t) else t.contiguous()
        layouts.append((t_dense, size))
        size += -(-t_dense.numel() * t_dense.element_size() // _ALIGN) * _ALIGN
    block = torch.empty(size, dtype=torch.uint8).share_memory_()
    slots: dict[int, _Slot] = {}
    for t, (dense, offset) in zip(tensors, layouts):
        view = _view(block, _Slot(offset, dense.dtype, tuple(dense.shape), tuple(dense.stride())))
        view.copy_(dense)
        slots[id(t)] = _Slot(offset, dense.dtype, tuple(dense.shape), tuple(dense.stride()))
    return Packed(block, _replace(batch, slots))


def _replace(obj: Any, slots: dict[int, _Slot]) -> Any:
    if isinstance(obj, torch.Tensor):
        return slots[id(obj)]
    if isinstance(obj, dict):
        return {k: _replace(v, slots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace(v, slots) for v in obj)
    return obj


def _view(block: torch.Tensor, slot: _Slot) -> torch.Tensor:
    nbytes = max((n - 1) * s for n, s in zip(slot.shape, slot.stride)) + 1 if all(slot.shape) else 0
    nbytes *= torch.empty((), dtype=slot.dtype).element_size()
    raw = block[slot.offset : slot.offset + nbytes]
    if nbytes == 0:
        return torch.empty(slot.shape, dtype=slot.dtype)
    return raw.view(slot.dtype).as_strided(slot.shape, slot.stride)


def unpack(obj: Any) -> Any:
    """The batch `pack` was given, its tensors now views into the (shared or pinned) block."""
    if not isinstance(obj, Packed):
        return obj

    def rebuild(x: Any) -> Any:
        if isinstance(x, _Slot):
            return _view(obj.block, x)
        if isinstance(x, dict):
            return {k: rebuild(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(rebuild(v) for v in x)
        return x

    return rebuild(obj.tree)
