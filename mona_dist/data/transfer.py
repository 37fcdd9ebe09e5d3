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
from typing import Any, Callable

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


def _map(obj: Any, leaf: type, fn: Callable[[Any], Any]) -> Any:
    """`obj` (nested dicts/lists/tuples) with every `leaf`-typed value replaced by `fn(value)`."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, leaf, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, leaf, fn) for v in obj)
    return obj


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
    copies: list[tuple[_Slot, torch.Tensor]] = []
    size = 0

    def place(t: torch.Tensor) -> _Slot:
        nonlocal size
        dense = t if _dense(t) else t.contiguous()
        slot = _Slot(size, dense.dtype, tuple(dense.shape), tuple(dense.stride()))
        copies.append((slot, dense))
        size += -(-dense.numel() * dense.element_size() // _ALIGN) * _ALIGN
        return slot

    tree = _map(batch, torch.Tensor, place)
    block = torch.empty(size, dtype=torch.uint8).share_memory_()
    for slot, dense in copies:
        _view(block, slot).copy_(dense)
    return Packed(block, tree)


def _view(block: torch.Tensor, slot: _Slot) -> torch.Tensor:
    if not all(slot.shape):
        return torch.empty(slot.shape, dtype=slot.dtype)
    nbytes = (sum((n - 1) * s for n, s in zip(slot.shape, slot.stride)) + 1) * slot.dtype.itemsize
    return block[slot.offset : slot.offset + nbytes].view(slot.dtype).as_strided(slot.shape, slot.stride)


def unpack(obj: Any) -> Any:
    """The batch `pack` was given, its tensors now views into the (shared or pinned) block."""
    if not isinstance(obj, Packed):
        return obj
    return _map(obj.tree, _Slot, lambda slot: _view(obj.block, slot))
