"""The device half of the data pipeline: uint8 pixels -> (jittered) normalised float, inside the model.

Loader workers hand out uint8 images and, with a `color_jitter`, the random draws for it (see `pipelines.py`);
every task model starts its forward with a `DataPreprocessor`, the role mmseg/mmdet 1.x give their
`data_preprocessor`. On the device the per-pixel work is batched GPU arithmetic, and a quarter of float32's bytes
cross shared memory, pinned buffers and PCIe.

Floating-point images are taken as already normalised and pass through unchanged, so hand-made float batches (the
benchmark's, a user's own loader) keep working.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torchvision.transforms.v2 import functional as F

from .config import IMAGENET_MEAN, IMAGENET_STD

# JitterDraw's columns: factors, then the order in which the four run (torchvision ColorJitter's fn_idx)
_ADJUST = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def apply_jitter(image: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter on one float (3, h, w) image in [0, 1], with one `JitterDraw` row."""
    factors, order = draw[:4].tolist(), draw[4:].long().tolist()
    for idx in order:
        identity = idx == 3 and factors[3] == 0.0 or idx != 3 and factors[idx] == 1.0
        if not identity:
            image = _ADJUST[idx](image, factors[idx])
    return image


class DataPreprocessor(nn.Module):
    """uint8 images -> optional photometric jitter -> `(x / 255 - mean) / std` -> padding zeroed (mmseg's pad 0).

    The result has the dtype the module was cast to (fp32, or bf16/fp16 after DeepSpeed casts the model), while
    the arithmetic runs in fp32. No state_dict entries: mean and std are config.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std need 3 channels and std > 0, got mean={mean} std={std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.register_buffer("dtype_probe", torch.zeros(()), persistent=False)  # follows .to()/.half()/.bfloat16()

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"

    def _one(self, image: torch.Tensor, draw: Optional[torch.Tensor]) -> torch.Tensor:
        """uint8 (..., 3, h, w) -> normalised float32; `draw` (one image only) jitters it first."""
        x = image.float().div_(255)
        if draw is not None:
            x = apply_jitter(x, draw)
        return F.normalize(x, list(self.mean), list(self.std))

    def forward(self, images: torch.Tensor | list[torch.Tensor], img_sizes: Optional[Sequence[Sequence[int]]] = None,
                jitter: Optional[torch.Tensor] = None) -> torch.Tensor | list[torch.Tensor]:
        """A (B, 3, H, W) batch, where `img_sizes` gives each image's valid (h, w) (the rest is padding), or a list
        of (3, h, w) images; `jitter` holds one `JitterDraw` row per image."""
        if jitter is not None:
            jitter = jitter.detach().float().cpu()  # 8 numbers per image, read as Python floats: one transfer
        if isinstance(images, (list, tuple)):
            return [im if im.is_floating_point() else
                    self._one(im, None if jitter is None else jitter[i]).to(self.dtype_probe.dtype)
                    for i, im in enumerate(images)]
        if images.is_floating_point():
            return images
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 pixels or normalised floats, got {images.dtype}")
        sizes = img_sizes or [tuple(images.shape[-2:])] * len(images)
        if jitter is None and all(tuple(s) == tuple(images.shape[-2:]) for s in sizes):
            out = self._one(images, None)  # the common case in one pass
        else:
            out = images.new_zeros(images.shape, dtype=torch.float32)
            for i, (h, w) in enumerate(sizes):  # jitter statistics (contrast's mean) see only the valid pixels
                out[i, :, :h, :w] = self._one(images[i, :, :h, :w], None if jitter is None else jitter[i])
        return out.to(self.dtype_probe.dtype)
