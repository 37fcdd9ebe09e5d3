"""The device half of the pipeline: normalisation, padding and the photometric jitter drawn in the workers."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from mona_dist.data.preprocess import DataPreprocessor, apply_jitter
from mona_dist.data.transforms import JitterDraw

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def reference(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (images.float() / 255 - mean) / std


def test_uint8_batches_are_normalised_and_floats_pass_through():
    pre = DataPreprocessor(MEAN, STD)
    images = pixels(2, 3, 8, 10)
    assert torch.allclose(pre(images), reference(images), atol=1e-6)
    already = torch.randn(2, 3, 8, 10)
    assert pre(already) is already
    listed = pre([images[0], images[1, :, :5]])  # detection: a list of differently sized images
    assert torch.allclose(listed[1], reference(images[1, :, :5]), atol=1e-6)
    with pytest.raises(TypeError, match="uint8 pixels or normalised floats"):
        pre(images.to(torch.int32))


def test_padding_is_zero_after_normalisation():
    images = pixels(2, 3, 8, 10)
    images[1, :, 6:], images[1, :, :, 7:] = 0, 0
    out = DataPreprocessor(MEAN, STD)(images, img_sizes=[(8, 10), (6, 7)])
    assert (out[1, :, 6:] == 0).all() and (out[1, :, :, 7:] == 0).all()
    assert torch.allclose(out[1, :, :6, :7], reference(images[1, :, :6, :7]), atol=1e-6)
    assert torch.allclose(out[0], reference(images[0]), atol=1e-6)


def test_output_follows_the_model_dtype_but_computes_in_fp32():
    pre = DataPreprocessor(MEAN, STD).bfloat16()  # what DeepSpeed's bf16 does to the whole model
    images = pixels(1, 3, 8, 8)
    out = pre(images)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference(images).to(torch.bfloat16))
    assert pre.state_dict() == {}  # nothing lands in checkpoints


def test_device_jitter_is_torchvisions_color_jitter_with_the_workers_draws():
    image = pixels(3, 12, 16).float() / 255
    for seed in range(5):
        torch.manual_seed(seed)
        draw = JitterDraw(0.4, 0.5, 0.5, 0.1)()
        torch.manual_seed(seed)  # the same draws through torchvision's own transform
        want = v2.ColorJitter(0.4, 0.5, 0.5, 0.1)(image)
        assert torch.allclose(apply_jitter(image, draw), want, atol=1e-6)
        assert not torch.allclose(want, image, atol=1e-2)  # the jitter did something


def test_skipped_or_disabled_jitter_is_the_identity():
    assert JitterDraw(0.4, 0.4, 0.4, 0.1, p=0.0)().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0]
    draw = JitterDraw(0.0, 0.5, 0.0, 0.0)()
    assert draw[[0, 2, 3]].tolist() == [1.0, 1.0, 0.0] and draw[1] != 1.0
    image = pixels(3, 8, 8).float() / 255
    assert torch.equal(apply_jitter(image, JitterDraw(0.4, 0.4, 0.4, 0.1, p=0.0)()), image)


def test_jitter_statistics_see_only_the_valid_pixels():
    torch.manual_seed(0)
    draws = torch.stack([JitterDraw(0.4, 0.8, 0.5, 0.1)() for _ in range(2)])
    small = pixels(3, 5, 6, seed=1)
    batch = torch.zeros(2, 3, 8, 10, dtype=torch.uint8)
    batch[0], batch[1, :, :5, :6] = pixels(3, 8, 10), small
    pre = DataPreprocessor(MEAN, STD)
    out = pre(batch, img_sizes=[(8, 10), (5, 6)], jitter=draws)
    alone = pre(small[None], jitter=draws[1:])  # contrast blends with the mean: padding must not enter it
    assert torch.allclose(out[1, :, :5, :6], alone[0], atol=1e-6)
    assert (out[1, :, 5:] == 0).all()
