"""torchvision transforms v2 built from a `PipelineConfig`.

Samples are dicts holding a `tv_tensors.Image` (uint8) and, per task, `tv_tensors.BoundingBoxes` / `tv_tensors.Mask`,
so every geometric step moves boxes and masks with the image. Two steps torchvision lacks are defined here:
`ShortSideResize` (detectron/mmdet keep-ratio resize with a short-side range, a long-side cap and mmseg's ratio jitter)
and `RandomCropNoPad` (crop at most the image size, with mmseg's cat_max_ratio for seg). The steps that touch pixels
run `kernels.py` (OpenCV, several times faster on uint8) on images and masks and torchvision's kernels on boxes.
Images stay uint8 to the end: photometric jitter and normalisation run on the device (`preprocess.DataPreprocessor`);
the worker only draws the jitter's random factors (`JitterDraw`). Where the recipe allows, resizing moves there too
and the worker only draws it: the detection resize without a crop (`DrawSize`), and seg training's crop resize and
flip (`CropWindow`, `DrawFlip`). `ResizeThenCrop` and torchvision's flip remain for detection pipelines with a crop.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from . import kernels
from .config import PipelineConfig

IGNORE_INDEX = 255


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, tv_tensors.Image):
            h, w = F.get_size(inpt)
            return h, w
    raise TypeError("sample has no tv_tensors.Image")


def _resize(inpt: Any, size: list[int]) -> Any:
    """Image and Mask through kernels.py (wrapped back into their tv_tensor class); boxes through torchvision."""
    if isinstance(inpt, tv_tensors.Image):
        return tv_tensors.wrap(kernels.resize_image(inpt.as_subclass(torch.Tensor), size), like=inpt)
    if isinstance(inpt, tv_tensors.Mask):
        return tv_tensors.wrap(kernels.resize_masks(inpt.as_subclass(torch.Tensor), size), like=inpt)
    return F.resize(inpt, size=size, antialias=True)


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
        return _resize(inpt, params["size"]) if isinstance(inpt, tv_tensors.TVTensor) else inpt


class DrawSize(ShortSideResize):
    """`ShortSideResize`'s draw without the resampling: the sample gets `"size"`, the (h, w) the model resizes to.

    Detection pipelines without a crop use this, so images, boxes and masks leave the worker at their stored size
    and the model resizes them on its device (`preprocess.DataPreprocessor.detection`), as torchvision's
    GeneralizedRCNNTransform does. Upscaling COCO's ~480x640 images to 800x1333 cost the worker as much as decoding
    them; on the device it is one batched bilinear pass. Flips commute with the resize, so they stay in the worker.
    """

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {**sample, "size": tuple(self.make_params([sample["image"]])["size"])}


class RandomResizedCrop(v2.RandomResizedCrop):
    """torchvision's RandomResizedCrop (same draws), resizing images and masks through kernels.py."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.TVTensor):
            return inpt
        return _resize(F.crop(inpt, **params), list(self.size))  # params: top, left, height, width


class RandomCropNoPad(v2.Transform):
    """Random crop of at most (h, w) -- smaller images keep their size and are padded later, per batch.

    `cat_max_ratio` (seg): re-draw up to 10 times while one class covers more than this share of the crop's labeled
    pixels (mmseg RandomCrop; crops over 65536 pixels are counted on every second row and column). Works on a 2-D
    `Mask` (seg); detection masks (N, H, W) are only cropped.
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

    def choose(self, h: int, w: int, label_window: Optional[Callable[[int, int, int, int], torch.Tensor]]
               ) -> tuple[int, int, int, int]:
        """(top, left, height, width) on an (h, w) canvas; `label_window(top, left, ch, cw)` gives the labels
        that crop would hold (for cat_max_ratio)."""
        top, left, ch, cw = self._draw(h, w)
        if self.cat_max_ratio is not None and self.cat_max_ratio < 1 and label_window is not None:
            for _ in range(10):
                labels = label_window(top, left, ch, cw)
                if labels.numel() > 2**16:  # a 2x2-subsampled count: the same decision at a quarter of the cost
                    labels = labels[::2, ::2]
                counts = torch.bincount(labels.flatten(), minlength=256)[:IGNORE_INDEX]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                top, left, ch, cw = self._draw(h, w)
        return top, left, ch, cw

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        label = _label_map(flat_inputs)
        window = None if label is None else lambda t, l, ch, cw: label[t : t + ch, l : l + cw]
        top, left, ch, cw = self.choose(h, w, window)
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class ResizeThenCrop(v2.Transform):
    """`ShortSideResize` then `RandomCropNoPad` (the same random draws), computed as crop-then-resize.

    Only the source window that the crop keeps is resampled, straight to the crop size: for ADE20K's recipe
    (resize x0.5-2, crop 512) that is a 512x512 output instead of a whole image up to twice the source's size. The
    window is the crop mapped back through the resize and rounded to source pixels, so the image, its label map and
    its boxes all go through exactly the same window and scale; against resize-then-crop the crop can sit up to one
    source pixel off. cat_max_ratio counts the labels of that source window.
    """

    def __init__(self, resize: ShortSideResize, crop: RandomCropNoPad):
        super().__init__()
        self.resize, self.crop = resize, crop

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        rh, rw = self.resize.make_params(flat_inputs)["size"]
        label = _label_map(flat_inputs)

        def source(top: int, left: int, ch: int, cw: int) -> tuple[int, int, int, int]:
            y0, x0 = min(h - 1, round(top * h / rh)), min(w - 1, round(left * w / rw))
            y1, x1 = max(y0 + 1, min(h, round((top + ch) * h / rh))), max(x0 + 1, min(w, round((left + cw) * w / rw)))
            return y0, x0, y1 - y0, x1 - x0

        def window(top: int, left: int, ch: int, cw: int) -> torch.Tensor:
            y0, x0, sh, sw = source(top, left, ch, cw)
            return label[y0 : y0 + sh, x0 : x0 + sw]

        top, left, ch, cw = self.crop.choose(rh, rw, None if label is None else window)
        y0, x0, sh, sw = source(top, left, ch, cw)
        return {"window": {"top": y0, "left": x0, "height": sh, "width": sw}, "size": [ch, cw]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.TVTensor):
            return inpt
        return _resize(F.crop(inpt, **params["window"]), params["size"])


class CropWindow(ResizeThenCrop):
    """`ResizeThenCrop`'s draws without the resampling: the sample keeps the source window (a view, no copy) and
    gets `"size"`, the crop size the model resizes it to on its device (`preprocess.DataPreprocessor.segmentation`).

    Seg training uses this: resampling each 512x512 crop (and flipping it) cost the workers half as much as decoding,
    and on the device it is one bilinear pass per image. The window, and so cat_max_ratio's decision, are exactly
    ResizeThenCrop's.
    """

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        params = self.make_params([v for v in sample.values() if isinstance(v, tv_tensors.TVTensor)])
        out = {k: F.crop(v, **params["window"]) if isinstance(v, tv_tensors.TVTensor) else v for k, v in sample.items()}
        return {**out, "size": tuple(params["size"])}


class DrawFlip(v2.Transform):
    """`v2.RandomHorizontalFlip(p)`'s draw (the same random number) without the flip: the sample gets `"flip"`,
    applied on the device after the resize. Used with `CropWindow`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {**sample, "flip": not bool(torch.rand(1) >= self.p)}  # v2's test: skip when rand >= p


def _label_map(flat_inputs: list[Any]) -> Optional[torch.Tensor]:
    """The seg label map (a 2-D Mask) among a sample's inputs, as a plain tensor."""
    label = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask) and x.ndim == 2), None)
    return None if label is None else label.as_subclass(torch.Tensor)


class JitterDraw:
    """The draws of `RandomApply([ColorJitter(...)], p)`, made in the worker; the pixels change on the device.

    Photometric jitter is per pixel, so it runs batched on the device (`preprocess.DataPreprocessor`, with
    torchvision's own float kernels) rather than in the worker, where it cost more than decoding the image (4 full
    passes over every pixel, the hue one through HSV). The random draws stay here, with the worker's seeded RNG, so
    the augmentation is still a function of (seed, epoch, rank). One draw is 8 floats: the factors for brightness,
    contrast, saturation and hue (identity 1, 1, 1, 0 when a component is off or the jitter is skipped), then
    torchvision's random order of the four.
    """

    IDENTITY = (1.0, 1.0, 1.0, 0.0)

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float = 1.0):
        self.jitter = v2.ColorJitter(brightness, contrast, saturation, hue)
        self.p = p

    def __call__(self) -> torch.Tensor:
        if self.p < 1.0 and float(torch.rand(1)) >= self.p:  # v2.RandomApply's rule
            return torch.tensor([*self.IDENTITY, 0, 1, 2, 3], dtype=torch.float32)
        params = self.jitter.make_params([])
        names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        factors = [ident if params[n] is None else float(params[n]) for n, ident in zip(names, self.IDENTITY)]
        return torch.tensor([*factors, *params["fn_idx"].tolist()], dtype=torch.float32)


def _per_box_fields(sample: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Everything SanitizeBoundingBoxes must filter along with the boxes (it filters Masks by itself)."""
    return tuple(sample[k] for k in ("labels", "iscrowd", "area", "difficult") if k in sample)


def build_transform(task: str, cfg: PipelineConfig, train: bool) -> v2.Transform:
    """The per-sample geometric transform of a split (`color_jitter` and `photometric` are drawn by the pipeline and
    applied on the device).
    Eval must be deterministic: random steps there are an error."""
    if not train:
        random_steps = [n for n in ("random_resized_crop", "crop", "color_jitter", "auto_augment", "photometric")
                        if getattr(cfg, n) is not None]
        if cfg.flip or (cfg.resize and (not isinstance(cfg.resize.short, int) or cfg.resize.ratio_range)):
            random_steps.append("flip/resize range")
        if random_steps:
            raise ValueError(f"eval_pipeline must be deterministic; remove: {', '.join(random_steps)}")
    steps: list[v2.Transform] = []
    if cfg.auto_augment is not None:
        from .autoaugment import AutoAugmentDraw

        others = [n for n in ("resize", "random_resized_crop", "crop", "center_crop") if getattr(cfg, n) is not None]
        if task not in ("coco", "voc") or others:
            raise ValueError(f"auto_augment is a detection resize policy of its own (task {task}); "
                             f"remove: {', '.join(others) or 'auto_augment'}")
        steps.append(AutoAugmentDraw(cfg.auto_augment))
    if cfg.resize is not None:
        # detection without a crop: the worker only draws the size, the model resizes (see DrawSize)
        defer = task in ("coco", "voc") and cfg.crop is None and cfg.random_resized_crop is None and not cfg.center_crop
        steps.append((DrawSize if defer else ShortSideResize)(cfg.resize.short, cfg.resize.max_size,
                                                               cfg.resize.ratio_range))
    if cfg.random_resized_crop is not None:
        rrc = cfg.random_resized_crop
        steps.append(RandomResizedCrop(rrc.size, scale=rrc.scale, antialias=True))
    if cfg.crop is not None:
        crop = RandomCropNoPad(cfg.crop.size, cfg.crop.cat_max_ratio if task == "seg" else None)
        fuse = steps and type(steps[-1]) is ShortSideResize
        # seg: the worker only picks the source window; resize and flip run on the device (see CropWindow)
        window = task == "seg" and cfg.center_crop is None  # nothing geometric may follow a deferred resize
        steps.append((CropWindow if window else ResizeThenCrop)(steps.pop(), crop) if fuse else crop)
    if cfg.center_crop is not None:
        steps.append(v2.CenterCrop(cfg.center_crop))
    if cfg.flip > 0:
        deferred = any(isinstance(t, CropWindow) for t in steps)
        steps.append(DrawFlip(cfg.flip) if deferred else v2.RandomHorizontalFlip(cfg.flip))
    if task in ("coco", "voc") and train and cfg.crop is not None:  # only a crop can leave empty boxes behind
        steps.append(v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_per_box_fields))
    if task == "cls" and cfg.random_resized_crop is None and cfg.center_crop is None and cfg.crop is None:
        raise ValueError("cls pipelines need random_resized_crop, crop or center_crop so a batch has one size")
    return v2.Compose(steps) if steps else v2.Identity()
