"""The official recipes' augmentations: mmseg's PhotoMetricDistortion (device side equals mmseg's own transform,
pixel for pixel) and mmdet's COCO AutoAugment policy (sizes by mmcv's rescale rule, crops, dropped objects)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from mona_dist.data.autoaugment import AutoAugmentDraw, rescale
from mona_dist.data.config import COCO_SCALES, AutoAugmentConfig, PhotoMetricConfig, PipelineConfig
from mona_dist.data.photometric import COLUMNS, PhotoMetricDraw, apply_photometric, hsv_to_rgb_u8, rgb_to_hsv_u8
from mona_dist.data.preprocess import DataPreprocessor
from mona_dist.data.transforms import build_transform


def mmseg_draw_row(rs: np.random.RandomState) -> list[float]:
    """mmseg PhotoMetricDistortion.transform's random calls, in its order, with its defaults (restated here)."""
    row = dict.fromkeys(COLUMNS, 0.0)
    row["c_alpha"] = row["s_alpha"] = 1.0
    if rs.randint(2):
        row.update(b_on=1.0, beta=rs.uniform(-32, 32))
    mode = rs.randint(2)
    row["c_last"] = float(mode == 0)

    def contrast():
        if rs.randint(2):
            row.update(c_on=1.0, c_alpha=rs.uniform(0.5, 1.5))

    if mode == 1:
        contrast()
    if rs.randint(2):
        row.update(s_on=1.0, s_alpha=rs.uniform(0.5, 1.5))
    if rs.randint(2):
        row.update(h_on=1.0, h_delta=rs.randint(-18, 18))
    if mode == 0:
        contrast()
    return [row[c] for c in COLUMNS]


@pytest.fixture(scope="module")
def mmseg_pmd():
    from mona_dist.tasks.mmcv_compat import install

    install()
    from mmseg.datasets.transforms import PhotoMetricDistortion

    return PhotoMetricDistortion()


@pytest.mark.parametrize("shape", [(64, 512), (37, 53)])  # a full SIMD row of OpenCV, and one with a scalar tail
def test_device_photometric_equals_mmseg_pixel_for_pixel(mmseg_pmd, shape):
    rng = np.random.default_rng(1)
    seen_on = np.zeros(len(COLUMNS))
    for seed in range(24):
        rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        np.random.seed(seed)  # mmseg draws from numpy's global generator
        ref = mmseg_pmd.transform({"img": cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)})["img"]
        row = mmseg_draw_row(np.random.RandomState(seed))
        seen_on += np.array(row) != 0
        out = apply_photometric(torch.from_numpy(rgb).permute(2, 0, 1).float(), row)
        np.testing.assert_array_equal(out.permute(1, 2, 0).numpy().astype(np.uint8),
                                      cv2.cvtColor(ref, cv2.COLOR_BGR2RGB), err_msg=f"seed {seed}, row {row}")
    assert all(seen_on[COLUMNS.index(c)] > 0 for c in ("b_on", "c_on", "s_on", "h_on", "c_last"))  # all paths ran


def test_hsv_kernels_equal_opencv():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (33, 70, 3), dtype=np.uint8)
    rgb[0] = 128  # grey pixels: zero saturation and diff
    hsv = rgb_to_hsv_u8(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(hsv, cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    hsv_in = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    back = hsv_to_rgb_u8(torch.from_numpy(hsv_in).permute(2, 0, 1)).permute(1, 2, 0).numpy().astype(np.uint8)
    np.testing.assert_array_equal(back, cv2.cvtColor(hsv_in, cv2.COLOR_HSV2RGB))


def test_photometric_draws_follow_mmseg_probabilities():
    torch.manual_seed(0)
    draw = PhotoMetricDraw()
    rows = torch.stack([draw() for _ in range(4000)])
    col = {c: rows[:, i] for i, c in enumerate(COLUMNS)}
    for flag in ("b_on", "c_on", "s_on", "h_on", "c_last"):
        assert abs(col[flag].mean().item() - 0.5) < 0.04, flag
    assert col["beta"][col["b_on"] == 1].abs().max() <= 32 and col["beta"][col["b_on"] == 0].abs().max() == 0
    hue = col["h_delta"][col["h_on"] == 1]
    assert hue.min() == -18 and hue.max() == 17  # numpy randint(-18, 18): high open
    assert col["c_alpha"][col["c_on"] == 1].min() >= 0.5 and col["s_alpha"][col["s_on"] == 1].max() <= 1.5


def test_seg_batches_carry_the_draws_and_the_device_applies_them():
    cfg = PipelineConfig(photometric=PhotoMetricConfig())
    from mona_dist.data.pipelines import TaskPipeline

    pipe = TaskPipeline("seg", cfg, train=True)
    torch.manual_seed(3)
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    records = [{"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(torch.zeros(20, 24, dtype=torch.uint8)),
                "photometric": pipe.photometric()} for _ in range(4)]
    batch = pipe.collate(records)
    assert batch["photometric"].shape == (4, len(COLUMNS))
    pre = DataPreprocessor()
    with_draws, _, _ = pre.segmentation(batch)
    plain, _, _ = pre.segmentation({k: v for k, v in batch.items() if k != "photometric"})
    rows = batch["photometric"]
    changed = [not torch.equal(with_draws[i], plain[i]) for i in range(4)]
    assert changed == [bool(rows[i, [0, 2, 5, 7]].any()) for i in range(4)]
    with pytest.raises(ValueError, match="photometric"):
        build_transform("seg", cfg, train=False)  # random steps stay out of eval


def test_rescale_is_mmcvs_keep_ratio_rule():
    from mmcv import rescale_size

    for h, w in [(480, 640), (427, 640), (640, 359), (1000, 3000), (7, 9)]:
        for short in (400, 480, 800):
            new_w, new_h = rescale_size((w, h), (1333, short))
            assert rescale(h, w, short, 1333) == (new_h, new_w)


def detection_sample(h=480, w=640):
    boxes = torch.tensor([[10.0, 10.0, 60.0, 80.0], [500.0, 300.0, 630.0, 470.0], [300.0, 5.0, 320.0, 475.0]])
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    return {"image": tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(masks), "labels": torch.tensor([1, 2, 3]),
            "iscrowd": torch.zeros(3, dtype=torch.bool), "area": torch.ones(3)}


def test_auto_augment_policies():
    cfg = AutoAugmentConfig()
    draw = AutoAugmentDraw(cfg)
    torch.manual_seed(0)
    finals = {rescale(480, 640, s, 1333) for s in COCO_SCALES}
    cropped, whole = 0, 0
    for _ in range(300):
        out = draw(detection_sample())
        h, w = out["image"].shape[-2:]
        if (h, w) == (480, 640):
            whole += 1
            assert out["size"] in finals and len(out["boxes"]) == 3
            continue
        cropped += 1
        # the window is a crop of 384-600 px (each side) of the image resized to 400/500/600, mapped back
        assert h <= 480 and w <= 640 and out["masks"].shape[-2:] == (h, w)
        n = len(out["boxes"])
        assert out["labels"].shape == (n,) and out["masks"].shape[0] == n and out["area"].shape == (n,)
        b = out["boxes"].as_subclass(torch.Tensor)
        assert bool(((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all())
        assert b[:, 0::2].min() >= 0 and b[:, 0::2].max() <= w and b[:, 1::2].max() <= h
        sh, sw = out["size"]
        assert min(sh, sw) in COCO_SCALES or max(sh, sw) == 1333 or abs(sh / sw - h / w) < 0.05
    assert 100 < cropped < 200 and whole == 300 - cropped  # each policy half the time
    with pytest.raises(ValueError, match="auto_augment"):
        build_transform("coco", PipelineConfig(auto_augment=cfg, resize={"short": 800}), train=True)
