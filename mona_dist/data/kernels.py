"""Pixel kernels for the loader workers: OpenCV on the images' own memory, torchvision semantics.

Why not torchvision's kernels: on uint8 images its resize costs 2-3x OpenCV's (measured on the 2-core CI machine,
one thread, 512x683 RGB upscaled 1.25x: 1.56 ms vs 0.56 ms, where decoding the JPEG costs ~2 ms), which made
augmentation, not decoding, the cost of a dense-task sample. torchvision's
`decode_image` returns a (3, H, W) *view* of interleaved (H, W, 3) memory, so these kernels reach OpenCV without a
copy and hand back the same kind of view; torchvision transforms v2 still carries the boxes and masks (the
transforms in `transforms.py` call these for `Image`/`Mask` and torchvision's kernels for everything else).

Interpolation: bilinear with half-pixel centres (cv2 INTER_LINEAR, what mmcv's imresize uses for the official
recipes) whenever no side shrinks below half; stronger shrinking goes through torchvision's antialiased resize,
since plain bilinear would alias there. Label maps and instance masks use nearest with half-pixel centres
(INTER_NEAREST_EXACT), which keeps them aligned with the bilinear image.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

# Workers are processes with one core's worth of work each; OpenCV's own thread pool would oversubscribe them.
cv2.setNumThreads(1)


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 tensor -> (H, W, C) array; no copy for channels-interleaved views (decoded images)."""
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def from_hwc(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) array -> (C, H, W) tensor viewing the same memory."""
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


def resize_image(image: torch.Tensor, size: list[int]) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, h, w): cv2 bilinear unless a side shrinks below half (then torchvision, antialiased)."""
    h, w = size
    if image.dtype != torch.uint8 or image.shape[0] > 4 or h * 2 < image.shape[-2] or w * 2 < image.shape[-1]:
        return F.resize_image(image, [h, w], antialias=True)
    if (h, w) == tuple(image.shape[-2:]):
        return image
    return from_hwc(cv2.resize(to_hwc(image), (w, h), interpolation=cv2.INTER_LINEAR))


def resize_masks(masks: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Nearest (half-pixel centres) resize of a (H, W) label map or (N, H, W) instance masks; uint8 or bool."""
    h, w = size
    if masks.shape[-2:] == (h, w):
        return masks
    if masks.dtype not in (torch.uint8, torch.bool):
        return F.resize_mask(masks, [h, w])
    planes = masks.reshape(-1, *masks.shape[-2:]).view(torch.uint8).numpy()
    out = torch.empty((planes.shape[0], h, w), dtype=torch.uint8)
    for i, plane in enumerate(planes):  # cv2 caps channels at 512 and is fastest one plane at a time
        out[i] = torch.from_numpy(cv2.resize(plane, (w, h), interpolation=cv2.INTER_NEAREST_EXACT))
    return out.view(masks.dtype).reshape(*masks.shape[:-2], h, w)
