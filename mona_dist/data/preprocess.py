"""The device half of the data pipeline: uint8 pixels -> (jittered) normalised float, inside the model.

Loader workers hand out uint8 images and, with a `color_jitter`, the random draws for it (see `pipelines.py`);
every task model starts its forward with a `DataPreprocessor`, the role mmseg/mmdet 1.x give their
`data_preprocessor`. On the device the per-pixel work is batched GPU arithmetic, and a quarter of float32's bytes
cross shared memory, pinned buffers and PCIe.

Detection images may also arrive at their stored size with a target size drawn by the worker
(`transforms.DrawSize`); `DataPreprocessor.detection` resizes them and their boxes and masks here, as
torchvision's GeneralizedRCNNTransform does.

Floating-point images are taken as already normalised and pass through unchanged, so hand-made float batches (the
benchmark's, a user's own loader) keep working.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torchvision.transforms.v2 import functional as F

from ..host_sync import host_values
from .config import IMAGENET_MEAN, IMAGENET_STD
from .photometric import apply_photometric

# JitterDraw's columns: factors, then the order in which the four run (torchvision ColorJitter's fn_idx)
_ADJUST = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def apply_jitter(image: torch.Tensor, draw: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """torchvision ColorJitter on one float (3, h, w) image in [0, 1], with one `JitterDraw` row (a CPU tensor or
    its 8 numbers)."""
    draw = host_values(draw) if isinstance(draw, torch.Tensor) else list(draw)
    factors, order = draw[:4], [int(v) for v in draw[4:]]
    for idx in order:
        identity = idx == 3 and factors[3] == 0.0 or idx != 3 and factors[idx] == 1.0
        if not identity:
            image = _ADJUST[idx](image, factors[idx])
    return image


class DataPreprocessor(nn.Module):
    """uint8 images -> resize/flip where the worker only drew them (`detection`, `segmentation`) -> optional
    photometric jitter -> `(x / 255 - mean) / std` -> padding zeroed (mmseg's pad 0).

    The arithmetic runs in fp32; the result has `output_dtype`: fp32, or the compute dtype an engine that casts
    the weights sets (`engine/precision.py`: DeepSpeed bf16/fp16). No buffers and no state_dict entries: mean and
    std are config, kept as fp32 device tensors built once per device (a tensor built from Python numbers at every
    call would be a blocking host-to-device copy per batch) and out of reach of any cast.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std need 3 channels and std > 0, got mean={mean} std={std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.output_dtype = torch.float32
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, output_dtype={self.output_dtype}"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """`(x - mean) / std` per channel, in place on a float (..., 3, h, w) tensor this module made."""
        stats = self._stats.get(x.device)
        if stats is None:
            stats = self._stats[x.device] = tuple(torch.tensor(v, device=x.device).view(3, 1, 1)
                                                  for v in (self.mean, self.std))
        return x.sub_(stats[0]).div_(stats[1])

    def _one(self, image: torch.Tensor, draw: Optional[Sequence[float]], size: Optional[Sequence[int]] = None,
             flip: bool = False, photo: Optional[Sequence[float]] = None) -> torch.Tensor:
        """uint8 (..., 3, h, w) -> normalised float32; resized to `size` and flipped first, then distorted with a
        `PhotoMetricDraw` row `photo` and jittered with `draw` (one image only) -- the order the worker's steps had."""
        x = image.float()
        if size is not None and tuple(size) != tuple(x.shape[-2:]):
            x = resize_pixels(x, size)
            if photo is not None:  # mmseg distorts the uint8 image its resize produced
                x = x.round_().clamp_(0, 255)
        if flip:
            x = x.flip(-1)
        if photo is not None:
            x = apply_photometric(x, photo)
        x = x.div_(255)
        if draw is not None:
            x = apply_jitter(x, draw)
        return self.normalize(x)

    def forward(self, images: torch.Tensor | list[torch.Tensor], img_sizes: Optional[Sequence[Sequence[int]]] = None,
                jitter: Optional[torch.Tensor] = None, sizes: Optional[Sequence[Sequence[int]]] = None,
                photometric: Optional[torch.Tensor] = None) -> torch.Tensor | list[torch.Tensor]:
        """A (B, 3, H, W) batch, where `img_sizes` gives each image's valid (h, w) (the rest is padding), or a list
        of (3, h, w) images, each resized to `sizes[i]` when given; `jitter` holds one `JitterDraw` row per image,
        `photometric` one `PhotoMetricDraw` row."""
        jitter, photometric = _draws(jitter), _draws(photometric)
        if isinstance(images, (list, tuple)):
            out = []
            for i, im in enumerate(images):
                size = None if sizes is None else sizes[i]
                if im.is_floating_point():  # already normalised: only resized
                    out.append(im if size is None or tuple(size) == tuple(im.shape[-2:]) else resize_pixels(im, size))
                else:
                    photo = None if photometric is None else photometric[i]
                    out.append(self._one(im, None if jitter is None else jitter[i], size, photo=photo)
                               .to(self.output_dtype))
            return out
        if images.is_floating_point():
            return images
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 pixels or normalised floats, got {images.dtype}")
        sizes = img_sizes or [tuple(images.shape[-2:])] * len(images)
        if jitter is None and photometric is None and all(tuple(s) == tuple(images.shape[-2:]) for s in sizes):
            out = self._one(images, None)  # the common case in one pass
        else:
            out = images.new_zeros(images.shape, dtype=torch.float32)
            for i, (h, w) in enumerate(sizes):  # jitter statistics (contrast's mean) see only the valid pixels
                out[i, :, :h, :w] = self._one(images[i, :, :h, :w], None if jitter is None else jitter[i],
                                              photo=None if photometric is None else photometric[i])
        return out.to(self.output_dtype)

    def segmentation(self, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[list]]:
        """A seg batch -> (normalised images, label maps, valid sizes). With "sizes" (`transforms.CropWindow`),
        each image's valid window and its labels are resized to sizes[i] and flipped where "flips" says, before
        the jitter, into a new batch padded with 0 / 255; otherwise images are normalised in place."""
        images, masks, valid = batch["images"], batch.get("masks"), batch.get("img_sizes")
        sizes = batch.get("sizes")
        if sizes is None:
            return self(images, valid, batch.get("jitter"), photometric=batch.get("photometric")), masks, valid
        jitter, photometric = _draws(batch.get("jitter")), _draws(batch.get("photometric"))
        flips = batch.get("flips")
        flips = [False] * len(images) if flips is None else host_values(flips)
        valid = valid or [tuple(images.shape[-2:])] * len(images)
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        out = images.new_zeros((len(images), 3, height, width), dtype=torch.float32)
        labels = None if masks is None else masks.new_full((len(images), height, width), 255)
        for i, ((h0, w0), (h, w)) in enumerate(zip(valid, sizes)):
            draw = None if jitter is None else jitter[i]
            photo = None if photometric is None else photometric[i]
            out[i, :, :h, :w] = self._one(images[i, :, :h0, :w0], draw, (h, w), flips[i], photo)
            if labels is not None:
                m = resize_labels(masks[i : i + 1, :h0, :w0], (h, w))[0]
                labels[i, :h, :w] = m.flip(-1) if flips[i] else m
        return out.to(self.output_dtype), labels, [tuple(sz) for sz in sizes]

    def detection(self, batch: dict) -> tuple[list[torch.Tensor], Optional[list[dict]]]:
        """A detection batch -> (normalised images at each target's "size", targets with boxes and masks resized
        to match). The worker only drew the sizes (`transforms.DrawSize`); a target without "size" keeps its
        image's size."""
        images, targets = batch["images"], batch.get("targets")
        extra = {"jitter": batch.get("jitter"), "photometric": batch.get("photometric")}
        if targets is None:
            return self(images, **extra), None
        sizes = [tuple(int(v) for v in t.get("size", im.shape[-2:])) for t, im in zip(targets, images)]
        out = self(images, sizes=sizes, **extra)
        return out, [resize_target(t, im.shape[-2:], size) for t, im, size in zip(targets, images, sizes)]


def _draws(draws: Optional[torch.Tensor]) -> Optional[list[list[float]]]:
    """`JitterDraw` / `PhotoMetricDraw` rows as Python numbers, a few per image. The batch keeps them on the host
    (`engine.move_batch` leaves "jitter" and "photometric" there): reading them from a device would stall the host
    at every batch."""
    return None if draws is None else host_values(draws.detach().float())


def resize_pixels(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Float (..., C, h, w) -> (..., C, *size): the workers' `kernels.resize_image` on the device -- bilinear with
    half-pixel centres (cv2 INTER_LINEAR, mmcv's imresize), antialiased only where a side shrinks below half."""
    shrink = size[0] * 2 < x.shape[-2] or size[1] * 2 < x.shape[-1]
    return F.resize_image(x, list(size), antialias=shrink)


def resize_labels(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """uint8 (N, h, w) instance masks or label maps -> (N, *size), nearest with half-pixel centres (the workers'
    `kernels.resize_masks`)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return torch.nn.functional.interpolate(masks[None], size=tuple(size), mode="nearest-exact")[0]


def resize_target(target: dict, src: Sequence[int], dst: Sequence[int]) -> dict:
    """A detection target's boxes and instance masks moved from an (h, w) = `src` image to `dst`.

    Boxes scale per axis (what torchvision's resize_bounding_boxes computes); masks use nearest with half-pixel
    centres, as the workers' `kernels.resize_masks`.
    """
    if tuple(src) == tuple(dst):
        return target
    out = dict(target, size=tuple(dst))
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    # Python-number factors: a tensor built from them would be a host-to-device copy per image
    boxes = target["boxes"].clone()
    boxes[:, 0::2] *= sx
    boxes[:, 1::2] *= sy
    out["boxes"] = boxes
    if target.get("masks") is not None:
        out["masks"] = resize_labels(target["masks"], dst)
    return out
