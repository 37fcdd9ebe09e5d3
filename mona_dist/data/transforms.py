"""torchvision transforms v2 built from a `PipelineConfig`.

Samples are dicts holding a `tv_tensors.Image` (uint8) and, per task, `tv_tensors.BoundingBoxes` / `tv_tensors.Mask`,
so every geometric step moves boxes and masks with the image. Two steps torchvision lacks are defined here:
`ShortSideResize` (detectron/mmdet keep-ratio resize with a short-side range, a long-side cap and mmseg's ratio jitter)
and `RandomCropNoPad` (crop at most the image size, with mmseg's cat_max_ratio for seg). Normalisation happens per
batch in `pipelines.py` (one float op per batch instead of per sample); padding too, after normalisation, like mmseg.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .config import PipelineConfig

IGNORE_INDEX = 255


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, tv_tensors.Image):
            h, w = F.get_size(inpt)
            return h, w
    raise TypeError("sample has no tv_tensors.Image")


class ShortSideResize(v2.Transform):
    """Resize keeping the aspect ratio: short side `short` (or drawn from [lo, hi]), long side at most `max_size`.

    With `ratio_range`, both short and max_size are scaled by r ~ U(lo, hi) first (mmseg RandomResize, keep_ratio).
    """

    def __init__(self, short: int | tuple[int, int], max_size: Optional[int] = None,
                 ratio_range: Optional[tuple[float, float]] = None):
        super().__init__()
        self.short = (short, short) if isinstance(short, int) else tuple(short)
        self.max_size = max_size
        self.ratio_range = ratio_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        lo, hi = self.short
        short = float(lo if lo == hi else int(torch.randint(lo, hi + 1, ()).item()))
        max_size = self.max_size
        if self.ratio_range is not None:
            r = self.ratio_range[0] + float(torch.rand(())) * (self.ratio_range[1] - self.ratio_range[0])
            short, max_size = short * r, (max_size * r if max_size else None)
        scale = short / min(h, w)
        if max_size and max(h, w) * scale > max_size:
            scale = max_size / max(h, w)
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomCropNoPad(v2.Transform):
    """Random crop of at most (h, w) -- smaller images keep their size and are padded later, per batch.

    `cat_max_ratio` (seg): re-draw up to 10 times while one class covers more than this share of the crop's labeled
    pixels (mmseg RandomCrop). Works on a 2-D `Mask` (seg); detection masks (N, H, W) are only cropped.
    """

    def __init__(self, size: tuple[int, int], cat_max_ratio: Optional[float] = None):
        super().__init__()
        self.size = tuple(size)
        self.cat_max_ratio = cat_max_ratio

    def _draw(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        return top, left, ch, cw

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        top, left, ch, cw = self._draw(h, w)
        label = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask) and x.ndim == 2), None)
        if self.cat_max_ratio is not None and self.cat_max_ratio < 1 and label is not None:
            for _ in range(10):
                crop = label[top : top + ch, left : left + cw].as_subclass(torch.Tensor)
                counts = torch.bincount(crop.flatten(), minlength=256)[:IGNORE_INDEX]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                top, left, ch, cw = self._draw(h, w)
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _per_box_fields(sample: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Everything SanitizeBoundingBoxes must filter along with the boxes (it filters Masks by itself)."""
    return tuple(sample[k] for k in ("labels", "iscrowd", "area", "difficult") if k in sample)


def build_transform(task: str, cfg: PipelineConfig, train: bool) -> v2.Transform:
    """The per-sample transform of a split. Eval must be deterministic: random steps there are an error."""
    if not train:
        random_steps = [n for n in ("random_resized_crop", "crop", "color_jitter") if getattr(cfg, n) is not None]
        if cfg.flip or (cfg.resize and (not isinstance(cfg.resize.short, int) or cfg.resize.ratio_range)):
            random_steps.append("flip/resize range")
        if random_steps:
            raise ValueError(f"eval_pipeline must be deterministic; remove: {', '.join(random_steps)}")
    steps: list[v2.Transform] = []
    if cfg.resize is not None:
        steps.append(ShortSideResize(cfg.resize.short, cfg.resize.max_size, cfg.resize.ratio_range))
    if cfg.random_resized_crop is not None:
        rrc = cfg.random_resized_crop
        steps.append(v2.RandomResizedCrop(rrc.size, scale=rrc.scale, antialias=True))
    if cfg.crop is not None:
        steps.append(RandomCropNoPad(cfg.crop.size, cfg.crop.cat_max_ratio if task == "seg" else None))
    if cfg.center_crop is not None:
        steps.append(v2.CenterCrop(cfg.center_crop))
    if cfg.flip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.flip))
    if cfg.color_jitter is not None:
        cj = cfg.color_jitter
        steps.append(v2.RandomApply([v2.ColorJitter(cj.brightness, cj.contrast, cj.saturation, cj.hue)], p=cj.p))
    if task in ("coco", "voc") and train and cfg.crop is not None:  # only a crop can leave empty boxes behind
        steps.append(v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_per_box_fields))
    if task == "cls" and cfg.random_resized_crop is None and cfg.center_crop is None and cfg.crop is None:
        raise ValueError("cls pipelines need random_resized_crop, crop or center_crop so a batch has one size")
    return v2.Compose(steps) if steps else v2.Identity()
