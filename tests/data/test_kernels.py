"""OpenCV pixel kernels against torchvision's semantics (bilinear, half-pixel centres; nearest-exact for masks)."""

from __future__ import annotations

import torch
from torch.nn import functional as tnf
from torchvision.io import decode_image, encode_jpeg
from torchvision.transforms.v2 import functional as F

from mona_dist.data import kernels


def smooth_image(h: int = 48, w: int = 64) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return (torch.stack([x, y, (x + y) / 2]) * 255).round().to(torch.uint8)


def test_bilinear_resize_matches_torchvision():
    # Noise: every output pixel depends on where its sample falls, so other sampling grids (align_corners=True,
    # measured 31-81 levels off here) and antialiasing (86 levels off at 48 -> 30) cannot pass; a linear ramp
    # resamples to itself under all of them. Shrinking by less than half is plain bilinear (kernels.py), so the
    # reference is torchvision without antialias (the same thing for the two enlargements).
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for size in ([60, 80], [96, 128], [30, 50]):  # up, up 2x, down by less than half
        ours = kernels.resize_image(image, size).float()
        want = F.resize(image, size, antialias=False).float()
        assert ours.shape == want.shape
        # both bilinear with half-pixel centres; OpenCV's fixed-point weights round apart by at most one level
        assert (ours - want).abs().max() <= 1, size


def test_strong_shrinking_goes_through_the_antialiased_resize():
    image = smooth_image(96, 128)
    assert torch.equal(kernels.resize_image(image, [30, 40]), F.resize(image, [30, 40], antialias=True))


def test_mask_resize_is_nearest_exact():
    masks = torch.randint(0, 2, (3, 20, 30), dtype=torch.uint8)
    # sizes with no exact ties ((x + 0.5) * scale never an integer): at a tie OpenCV and torch may round apart
    for size in ([36, 52], [12, 16]):
        want = tnf.interpolate(masks[None].float(), size=size, mode="nearest-exact")[0].to(torch.uint8)
        assert torch.equal(kernels.resize_masks(masks, size), want)
        assert kernels.resize_masks(masks[0], size).shape == tuple(size)  # a 2-D label map too
    assert kernels.resize_masks(masks[:0], [5, 6]).shape == (0, 5, 6)  # an image without objects


def test_decoded_images_reach_opencv_without_a_copy():
    decoded = decode_image(encode_jpeg(smooth_image()))
    assert kernels.to_hwc(decoded).ctypes.data == decoded.data_ptr()  # decode_image's (3,H,W) is interleaved memory
    resized = kernels.resize_image(decoded, [60, 80])
    assert resized.permute(1, 2, 0).is_contiguous()  # and hands back the same layout
