"""Tiny in-memory batches in the mona_dist batch formats (docs/ARCHITECTURE.md) for the dense-task unit tests.

Objects are coloured rectangles on a noisy background.
"""

from __future__ import annotations

import torch

COLORS = torch.tensor([[0.0, 0.0, 0.0], [1.5, -1.0, -1.0], [-1.0, -1.0, 1.5], [-1.0, 1.5, -1.0]])


def rectangles(gen: torch.Generator, size: int, num_classes: int, per_class: int = 1):
    """[(label, x1, y1, x2, y2)] of random rectangles, one or more per class 1..num_classes."""
    out = []
    for c in range(1, num_classes + 1):
        for _ in range(per_class):
            w, h = torch.randint(size // 5, size // 2, (2,), generator=gen).tolist()
            x, y = torch.randint(0, size - w, (1,), generator=gen).item(), torch.randint(0, size - h, (1,), generator=gen).item()
            out.append((c, x, y, x + w, y + h))
    return out


def seg_batches(seed: int, n: int, batch: int, size: int = 64, num_classes: int = 2) -> list[dict]:
    """seg batches: class 0 background, 1..K coloured rectangles, a border of 255 (ignore)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=gen) * 0.3
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for c, x1, y1, x2, y2 in rectangles(gen, size, num_classes, per_class=2):
            masks[i, y1:y2, x1:x2] = c
        images[i] += COLORS[masks[i]].permute(2, 0, 1)
    masks[:, :2] = 255
    return [{"images": images[i : i + batch], "masks": masks[i : i + batch]} for i in range(0, n, batch)]


def det_batches(seed: int, n: int, batch: int, size: int = 64, num_classes: int = 2, with_masks: bool = True) -> list[dict]:
    """coco/voc batches: one rectangle per class per image, labels 1..K; orig_size is twice the image size."""
    gen = torch.Generator().manual_seed(seed)
    batches, images, targets = [], [], []
    for i in range(n):
        img = torch.randn(3, size, size, generator=gen) * 0.3
        objs = rectangles(gen, size, num_classes)
        masks = torch.zeros(len(objs), size, size, dtype=torch.uint8)
        for k, (c, x1, y1, x2, y2) in enumerate(objs):
            img[:, y1:y2, x1:x2] += COLORS[c][:, None, None]
            masks[k, y1:y2, x1:x2] = 1
        t = {
            "boxes": torch.tensor([o[1:] for o in objs], dtype=torch.float32),
            "labels": torch.tensor([o[0] for o in objs], dtype=torch.int64),
            "image_id": i + 1,
            "orig_size": (2 * size, 2 * size),
        }
        if with_masks:
            t["masks"] = masks
        else:
            t["difficult"] = torch.zeros(len(objs), dtype=torch.bool)
        images.append(img)
        targets.append(t)
        if len(images) == batch:
            batches.append({"images": images, "targets": targets})
            images, targets = [], []
    return batches

