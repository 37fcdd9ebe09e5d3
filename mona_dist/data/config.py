"""Typed `data:` section of a run config (pydantic v2, unknown keys are errors).

The trainer's schema embeds `DataConfig` as its `data:` field; everything the loaders need is here, so the data
package never reads a dict or an environment variable.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResizeConfig(_Strict):
    """Keep-ratio resize by the short side, capped by the long side (detectron/mmdet style).

    `short: [480, 800], max_size: 1333` is the COCO multi-scale recipe "480-800 x 1333": each training sample draws
    its short side uniformly from the range. `ratio_range` is mmseg's RandomResize: both `short` and `max_size` are
    multiplied by r ~ U(lo, hi) (ADE20K: short 512, max 2048, ratio 0.5-2.0).
    """

    short: int | tuple[int, int] = Field(description="short side in pixels, or [lo, hi] to draw per sample")
    max_size: Optional[int] = Field(None, description="cap on the long side after resizing")
    ratio_range: Optional[tuple[float, float]] = Field(None, description="scale jitter on short and max_size")

    @field_validator("short")
    @classmethod
    def _range(cls, v):
        lo, hi = (v, v) if isinstance(v, int) else v
        if not 0 < lo <= hi:
            raise ValueError(f"resize.short must be positive with lo <= hi, got {v}")
        return v


class CropConfig(_Strict):
    """Random crop (train) of `size` = [h, w]; seg may reject crops dominated by one class (mmseg cat_max_ratio)."""

    size: tuple[int, int]
    cat_max_ratio: Optional[float] = Field(None, gt=0, le=1, description="seg only: max share of one class")


class RandomResizedCropConfig(_Strict):
    """Inception-style crop for classification training (torchvision RandomResizedCrop)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)


class ColorJitterConfig(_Strict):
    """Photometric jitter (torchvision ColorJitter); zero turns a component off."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0
    p: float = Field(1.0, ge=0, le=1, description="probability to apply the jitter at all")


COCO_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


class AutoAugmentConfig(_Strict):
    """mmdet 2.x `AutoAugment` with the DETR / Sparse R-CNN policies of the official COCO recipe.

    Per sample one of two policies, uniformly: (a) keep-ratio resize to a short side drawn from `scales` (long side
    at most `max_size`); (b) keep-ratio resize to a short side from `crop_scales`, a random crop whose height and
    width are each drawn from [crop_size[0], crop_size[1]] (at most the image's), objects left without area dropped
    (allow_negative_crop), then (a) on the crop.
    """

    scales: tuple[int, ...] = COCO_SCALES
    max_size: int = Field(1333, gt=0)
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)

    @model_validator(mode="after")
    def _sizes(self) -> "AutoAugmentConfig":
        if not self.scales or not self.crop_scales or min(*self.scales, *self.crop_scales) <= 0:
            raise ValueError("auto_augment.scales and crop_scales need positive short sides")
        if not 0 < self.crop_size[0] <= self.crop_size[1]:
            raise ValueError(f"auto_augment.crop_size needs 0 < lo <= hi, got {self.crop_size}")
        return self


class PhotoMetricConfig(_Strict):
    """mmseg's `PhotoMetricDistortion` (official ADE20K recipe): brightness `+ U(-delta, delta)`, contrast
    `x U(range)`, saturation (HSV S) `x U(range)`, hue (HSV H) `+ randint(-delta, delta)`, each with p = 0.5,
    contrast second or last; drawn in the workers, applied on the device (`data/photometric.py`)."""

    brightness_delta: int = Field(32, ge=0)
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = Field(18, ge=0)


class PipelineConfig(_Strict):
    """Per-sample transforms, applied in this order: resize (or auto_augment), random_resized_crop, crop,
    center_crop, flip, jitter / photometric.

    Unset steps are skipped. Eval pipelines should use only `resize` (+ `center_crop` for cls): they are run
    deterministically whatever is set (random steps are dropped in eval, see `mona_dist.data.transforms`).
    """

    resize: Optional[ResizeConfig] = None
    random_resized_crop: Optional[RandomResizedCropConfig] = None
    crop: Optional[CropConfig] = None
    center_crop: Optional[int] = Field(None, description="cls eval: square centre crop after resize")
    flip: float = Field(0.0, ge=0, le=1, description="horizontal flip probability")
    color_jitter: Optional[ColorJitterConfig] = None
    auto_augment: Optional[AutoAugmentConfig] = Field(None, description="coco/voc train: mmdet's multi-scale policy")
    photometric: Optional[PhotoMetricConfig] = Field(None, description="mmseg's PhotoMetricDistortion")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def default_pipeline(task: str, split: str) -> PipelineConfig:
    """The official recipes' pipelines (REFERENCE.md), used when a config leaves a pipeline out."""
    train = split == "train"
    if task == "cls":
        if train:
            return PipelineConfig(random_resized_crop=RandomResizedCropConfig(size=224), flip=0.5)
        return PipelineConfig(resize=ResizeConfig(short=256), center_crop=224)
    if task == "seg":
        if train:
            return PipelineConfig(
                resize=ResizeConfig(short=512, max_size=2048, ratio_range=(0.5, 2.0)),
                crop=CropConfig(size=(512, 512), cat_max_ratio=0.75),
                flip=0.5,
                photometric=PhotoMetricConfig(),
            )
        return PipelineConfig(resize=ResizeConfig(short=512, max_size=2048))
    if task == "coco":
        if train:
            return PipelineConfig(auto_augment=AutoAugmentConfig(), flip=0.5)
        return PipelineConfig(resize=ResizeConfig(short=800, max_size=1333))
    if task == "voc":
        return PipelineConfig(resize=ResizeConfig(short=600, max_size=1000), flip=0.5 if train else 0.0)
    raise ValueError(f"unknown data task {task!r}; valid: cls, coco, seg, voc")


class DataConfig(_Strict):
    """Where the shards are and how they stream.

    Shard specs accept a brace pattern (`dir/train-{000000..000031}.tar`), a glob (`dir/train-*.tar`), an index file
    (`dir/train.index.json`), a directory holding exactly one `*.index.json`, or any URL webdataset opens (the index
    is then looked up next to the shards as `<prefix>.index.json`). A `pipe:CMD` spec runs CMD in a shell in every
    loader worker, so a config holding one runs code: it is refused unless `allow_pipe: true`. Pipe specs never get
    an index (looking for one would run a command in the trainer itself), so their epochs have no known length.
    """

    train_shards: str = Field(description="training shards (see class docstring for the accepted forms)")
    val_shards: Optional[str] = Field(None, description="validation shards; None disables evaluation")
    batch_size: int = Field(2, gt=0, description="training samples per rank per step")
    eval_batch_size: int = Field(1, gt=0, description="evaluation samples per rank per batch")
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank (0 = in the main process)")
    shuffle_buffer: int = Field(1000, ge=0, description="per-worker sample shuffle buffer (train); 0 disables")
    resampled: bool = Field(False, description="draw shards with replacement; an epoch is `epoch_samples` long")
    epoch_samples: Optional[int] = Field(None, gt=0, description="resampled mode: samples per epoch, all ranks")
    drop_last: bool = Field(True, description="train: drop each worker's last partial batch (equal steps per rank)")
    reduce_zero_label: bool = Field(True, description="seg: raw 0 -> 255 (ignore), k -> k-1, as mmseg for ADE20K")
    pin_memory: bool = Field(True, description="pin batches when CUDA is present")
    prefetch_factor: int = Field(2, gt=0, description="batches each worker prepares ahead")
    train_pipeline: Optional[PipelineConfig] = Field(None, description="None = the task's default (config.py)")
    eval_pipeline: Optional[PipelineConfig] = Field(None, description="None = the task's default (config.py)")
    allow_pipe: bool = Field(False, description="let train_shards/val_shards be `pipe:` shell commands (trusted "
                             "configs only: they run in the loader workers)")

    @model_validator(mode="after")
    def _resampled_needs_length(self) -> "DataConfig":
        if self.resampled and self.epoch_samples is None:
            raise ValueError("data.resampled needs data.epoch_samples (samples per epoch over all ranks)")
        for key in ("train_shards", "val_shards"):
            spec = getattr(self, key)
            if spec and "pipe:" in spec and not self.allow_pipe:
                raise ValueError(f"data.{key}: a pipe: spec runs a shell command ({spec[:60]!r}); set "
                                 f"data.allow_pipe: true only if you trust this config")
        return self

    def pipeline(self, task: str, split: Literal["train", "val"]) -> PipelineConfig:
        chosen = self.train_pipeline if split == "train" else self.eval_pipeline
        return chosen if chosen is not None else default_pipeline(task, split)
