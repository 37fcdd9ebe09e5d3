"""One shared block per batch between loader workers and the trainer (transfer.py's workaround)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset

from mona_dist.data.transfer import BlockLedger, BlockPool, Packed, pack, unpack


def batch() -> dict:
    images = torch.arange(2 * 5 * 6 * 3, dtype=torch.uint8).reshape(2, 5, 6, 3).permute(0, 3, 1, 2)  # channels-last
    return {
        "images": images,
        "targets": [
            {"boxes": torch.arange(12.0).reshape(3, 4) / 7, "labels": torch.tensor([1, 2, 3]),
             "masks": torch.ones(3, 5, 6, dtype=torch.uint8), "iscrowd": torch.tensor([True, False, True]), "image_id": 7, "orig_size": (5, 6)},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 5, 6, dtype=torch.uint8), "iscrowd": torch.zeros(0, dtype=torch.bool),
             "image_id": 8, "orig_size": (5, 6)},
        ],
        "crop": torch.arange(20.0).reshape(4, 5)[:, 1:3],  # a non-dense view: sent as its contiguous copy
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_pack_unpack_round_trip_keeps_values_layout_and_one_block():
    original = batch()
    packed = pack(original)
    assert isinstance(packed, Packed) and packed.block.is_shared()
    out = unpack(packed)
    assert_same(original, out)
    assert out["images"].stride() == original["images"].stride()  # channels-last survives
    base = packed.block.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in (out["images"], out["targets"][0]["boxes"],
                                                                 out["targets"][0]["masks"], out["crop"]))
    assert unpack(original) is original  # unpacked batches (workers=0) pass through


class _Batches(IterableDataset):
    def __iter__(self):
        for _ in range(3):
            yield pack(batch())


def test_packed_batches_cross_real_worker_processes():
    for packed in DataLoader(_Batches(), batch_size=None, num_workers=2, collate_fn=lambda x: x):
        assert_same(batch(), unpack(packed))


class _Pooled(IterableDataset):
    """Batch i is filled with the value i, so a block overwritten while the trainer holds it shows."""

    def __init__(self, flags: torch.Tensor, n: int):
        self.flags, self.n = flags, n

    def __iter__(self):
        pool = BlockPool(self.flags, 0)
        for i in range(self.n):
            yield pack({"images": torch.full((3, 64, 64), i, dtype=torch.uint8), "i": i}, pool)


def test_pooled_blocks_are_reused_only_after_the_trainer_lets_go():
    # 6 blocks: one held to the end, and at most 4 out at once otherwise (2 prefetched, the one being received,
    # the one the loop variable still holds, the one before it until the next receive notices it was dropped)
    ledger = BlockLedger(workers=1, slots=6)
    held, slots = [], []
    loader = DataLoader(_Pooled(ledger.flags, 24), batch_size=None, num_workers=1, collate_fn=lambda x: x,
                        prefetch_factor=2)
    for packed in loader:
        ledger.receive(packed)
        slots.append(packed.slot)
        batch = unpack(packed)
        del packed
        if batch["i"] == 0:
            held.append(batch)  # kept to the end: its block must never be handed back
        assert torch.equal(batch["images"], torch.full((3, 64, 64), batch["i"], dtype=torch.uint8))
    assert torch.equal(held[0]["images"], torch.zeros((3, 64, 64), dtype=torch.uint8))
    assert slots[0] is not None and slots[0] not in slots[1:]  # the held block stayed out of the pool
    assert None not in slots and len(set(slots)) <= 6  # every batch travelled in a pooled, reused block
