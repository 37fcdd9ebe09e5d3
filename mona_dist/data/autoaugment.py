"""mmdet 2.x `AutoAugment` with the official COCO recipe's two multi-scale policies, drawn in the worker.

mmdet runs, per image, one of two policies picked uniformly:
  (a) `Resize(img_scale=[(480, 1333), ..., (800, 1333)], multiscale_mode='value', keep_ratio=True)`;
  (b) the same kind of resize to one of (400|500|600, 1333), `RandomCrop(crop_type='absolute_range',
      crop_size=(384, 600), allow_negative_crop=True)`, then (a) again on the crop.
mmcv's keep-ratio rescale: factor `min(long_cap / long, short / short_side)`, sides `int(x * factor + 0.5)`.
mmdet's crop: height and width each `randint(min(side, lo), min(side, hi) + 1)`, offset uniform in the margin,
boxes shifted and clipped, objects whose box has no area left dropped (with their masks and labels).

Here the worker only draws: like `transforms.DrawSize`, the sample gets `"size"`, the (h, w) the model resizes to on
its device. Policy (b) is computed as crop-then-resize: the crop is mapped back through the first resize to a
window of source pixels (rounded, as `transforms.ResizeThenCrop`), the image, masks and boxes are cut to that window
(a view, no resampling), and the device resizes the window straight to the final size. Against mmdet the crop can
sit up to one source pixel off, and the intermediate downscale to 400-600 px is not applied to the pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .config import AutoAugmentConfig

PER_BOX = ("labels", "iscrowd", "area", "difficult")


def rescale(h: int, w: int, short: int, long_cap: int) -> tuple[int, int]:
    """mmcv 1.x `rescale_size((w, h), (long_cap, short))`: keep ratio, short side `short`, long side <= cap."""
    factor = min(long_cap / max(h, w), short / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _randint(lo: int, hi: int) -> int:
    """Uniform in [lo, hi) from the worker's seeded torch generator (numpy's randint semantics)."""
    return int(torch.randint(lo, hi, ()).item())


class AutoAugmentDraw(v2.Transform):
    """Draws one of mmdet's two policies for a detection sample; see the module docstring."""

    def __init__(self, cfg: AutoAugmentConfig):
        super().__init__()
        self.cfg = cfg

    def _final_size(self, h: int, w: int) -> tuple[int, int]:
        return rescale(h, w, self.cfg.scales[_randint(0, len(self.cfg.scales))], self.cfg.max_size)

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        h, w = F.get_size(sample["image"])
        if _randint(0, 2) == 0:
            return {**sample, "size": self._final_size(h, w)}
        c = self.cfg
        rh, rw = rescale(h, w, c.crop_scales[_randint(0, len(c.crop_scales))], c.max_size)
        lo, hi = c.crop_size
        ch, cw = _randint(min(rh, lo), min(rh, hi) + 1), _randint(min(rw, lo), min(rw, hi) + 1)
        top, left = _randint(0, rh - ch + 1), _randint(0, rw - cw + 1)
        # the crop in source pixels: its edges mapped back through the first resize
        y0, x0 = min(h - 1, round(top * h / rh)), min(w - 1, round(left * w / rw))
        y1, x1 = max(y0 + 1, min(h, round((top + ch) * h / rh))), max(x0 + 1, min(w, round((left + cw) * w / rw)))
        window = {"top": y0, "left": x0, "height": y1 - y0, "width": x1 - x0}
        out = {k: F.crop(v, **window) if isinstance(v, tv_tensors.TVTensor) else v for k, v in sample.items()}
        boxes = out["boxes"].as_subclass(torch.Tensor)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # mmdet's valid_inds after clipping
        if not bool(keep.all()):
            out["boxes"] = tv_tensors.wrap(out["boxes"][keep], like=out["boxes"])
            if "masks" in out:
                out["masks"] = tv_tensors.wrap(out["masks"][keep], like=out["masks"])
            for key in PER_BOX:
                if key in out:
                    out[key] = out[key][keep]
        return {**out, "size": self._final_size(ch, cw)}
