"""Per-task decode -> transform -> collate, producing exactly the batches of docs/ARCHITECTURE.md.

  cls   {"images": uint8 (B,3,H,W), "labels": int64 (B,)}
  seg   {"images": uint8 (B,3,H,W), "masks": uint8 (B,H,W), "img_sizes"}  masks 0..K-1, 255 = ignore
        (reduce_zero_label like mmseg); "img_sizes" lists each image's valid, unpadded (h, w). Training with a
        resize + crop adds "sizes" (the crop size of each) and "flips" bool (B,): images and masks are then the
        source windows the crops come from, and the model resizes and flips them on its device
        (`transforms.CropWindow`, `preprocess.DataPreprocessor.segmentation`). Eval adds
        "orig_masks" (list of int64 (H0,W0), the untouched label maps after reduce_zero_label) and "orig_size":
        evaluate by cropping logits to img_sizes[i], resizing to orig_size[i] and comparing with orig_masks[i].
  coco  {"images": list of uint8 (3,h,w), "targets": list of {boxes, labels 1..K, masks uint8 (N,h,w), size,
        image_id, orig_size, iscrowd, area}}; training targets exclude crowd regions, eval targets keep them
  voc   same with {boxes, labels, difficult, size, image_id, orig_size}; training targets exclude difficult objects
        (mmdet's rule), eval targets keep them. VOC's 1-based inclusive boxes become [x1-1, y1-1, x2, y2].
        Boxes and masks are in the pixels of the image as it travels; "size" is the (h, w) the model resizes
        image, boxes and masks to on its device (`transforms.DrawSize`): without a crop in the pipeline, detection
        images travel at their stored size.
Images leave the workers as uint8 pixels (a quarter of float32's bytes through shared memory, pinning and the host
to device copy); the model normalises them on its device and zeroes the padding (`preprocess.DataPreprocessor`, as
mmseg/mmdet 1.x's data preprocessors do). Batches are padded (cls/seg) with pixel 0 and label 255. With a
`color_jitter` in the train pipeline, batches carry "jitter": float (B, 8), the worker's random draws for each
sample, which the device applies before normalising (`preprocess.DataPreprocessor`, `transforms.JitterDraw`);
with a `photometric` step, "photometric": float (B, 9), mmseg PhotoMetricDistortion's draws (`photometric.py`).
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from .config import PipelineConfig
from .photometric import PhotoMetricDraw
from .transforms import IGNORE_INDEX, JitterDraw, build_transform

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


def decode_rgb_bytes(data: bytes) -> torch.Tensor:
    """Encoded image bytes (any IMAGE_KEYS format, told by its content) as uint8 (3, H, W); libjpeg-turbo/libpng
    through torchvision. Training, eval and predict all decode here.

    16-bit PNGs decode as uint16 (copied into a uint8 batch they wrapped modulo 256): they are scaled to 8 bits
    by keeping the high byte, as torchvision's `to_dtype(..., scale=True)` and PIL (16-bit RGB) do. The result keeps
    decode_image's layout, a (3, H, W) view of (H, W, 3) memory (data/kernels.py relies on it)."""
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if image.dtype == torch.uint16:
        image = (image.permute(1, 2, 0).to(torch.int32) >> 8).to(torch.uint8).permute(2, 0, 1)
    return image


def decode_rgb(sample: dict[str, Any], exclude: str = "") -> torch.Tensor:
    """The sample's image as uint8 (3, H, W)."""
    for key in IMAGE_KEYS:
        if key in sample and key != exclude:
            return decode_rgb_bytes(sample[key])
    raise KeyError(f"no image member ({'/'.join(IMAGE_KEYS)}) in sample; members: {sorted(sample)}")


def decode_label_map(data: bytes) -> np.ndarray:
    """A PNG label map as stored (L or P mode indices, not palette colours) -- hence PIL, not decode_png."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map has mode {im.mode}, expected a single-channel index image")
        return np.asarray(im)


def reduce_zero_label(label: torch.Tensor) -> torch.Tensor:
    """mmseg's ADE20K rule: raw 0 ("other") -> 255 ignore, k -> k-1, 255 stays 255 (uint8 wrap-around does 0)."""
    out = label.to(torch.uint8) - 1
    out[out == IGNORE_INDEX - 1] = IGNORE_INDEX
    return out


def _coco_masks(anns: list[dict], h: int, w: int) -> torch.Tensor:
    from pycocotools import mask as mask_utils

    out = torch.zeros((len(anns), h, w), dtype=torch.uint8)
    for i, ann in enumerate(anns):
        seg = ann["segmentation"]
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):  # uncompressed RLE (crowd)
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        out[i] = torch.from_numpy(mask_utils.decode(rle))
    return out


def _boxes(xyxy: list[list[float]], h: int, w: int) -> tv_tensors.BoundingBoxes:
    t = torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4)
    t[:, 0::2] = t[:, 0::2].clamp(0, w)
    t[:, 1::2] = t[:, 1::2].clamp(0, h)
    return tv_tensors.BoundingBoxes(t, format="XYXY", canvas_size=(h, w))


def _coco_record(sample: dict, train: bool, cat_to_label: dict[int, int]) -> dict[str, Any]:
    meta = json.loads(sample["json"])
    image = decode_rgb(sample)
    h, w = image.shape[-2:]
    anns = [a for a in meta["annotations"] if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
    if train:
        anns = [a for a in anns if not a.get("iscrowd", 0)]
    xyxy = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
    return {
        "image": tv_tensors.Image(image),
        "boxes": _boxes(xyxy, h, w),
        "labels": torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
        "masks": tv_tensors.Mask(_coco_masks(anns, h, w)),
        "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
        "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
        "image_id": int(meta["image"]["id"]),
        "orig_size": (int(h), int(w)),
    }


def _voc_record(sample: dict, train: bool, name_to_label: dict[str, int]) -> dict[str, Any]:
    meta = json.loads(sample["json"])
    image = decode_rgb(sample)
    h, w = image.shape[-2:]
    objs = [o for o in meta["objects"] if not (train and o["difficult"])]
    xyxy = [[o["bbox"][0] - 1, o["bbox"][1] - 1, o["bbox"][2], o["bbox"][3]] for o in objs]
    return {
        "image": tv_tensors.Image(image),
        "boxes": _boxes(xyxy, h, w),
        "labels": torch.tensor([name_to_label[o["name"]] for o in objs], dtype=torch.int64),
        "difficult": torch.tensor([bool(o["difficult"]) for o in objs], dtype=torch.bool),
        "image_id": int(meta["image_id"]),
        "orig_size": (int(h), int(w)),
    }


def _seg_record(sample: dict, train: bool, reduce_zero: bool) -> dict[str, Any]:
    image = decode_rgb(sample, exclude="png")
    label = torch.from_numpy(decode_label_map(sample["png"]).astype(np.uint8))
    if label.shape != image.shape[-2:]:
        raise ValueError(f"label map {tuple(label.shape)} does not match image {tuple(image.shape[-2:])}")
    if reduce_zero:
        label = reduce_zero_label(label)
    rec = {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(label)}
    if not train:
        rec["orig_mask"] = label.to(torch.int64)
    return rec


def _cls_record(sample: dict, train: bool) -> dict[str, Any]:
    label = int(sample["cls"]) if "cls" in sample else int(json.loads(sample["json"])["label"])
    return {"image": tv_tensors.Image(decode_rgb(sample)), "label": label}


def pad_stack(tensors: list[torch.Tensor], fill: int) -> torch.Tensor:
    """uint8 (h, w, ...) tensors -> (B, H, W, ...), padded with `fill` at the bottom/right where sizes differ."""
    h = max(t.shape[0] for t in tensors)
    w = max(t.shape[1] for t in tensors)
    out = torch.empty((len(tensors), h, w, *tensors[0].shape[2:]), dtype=torch.uint8)
    for i, t in enumerate(tensors):
        th, tw = t.shape[:2]
        out[i, :th, :tw] = t
        out[i, th:].fill_(fill)  # fill only the padding, not the whole batch first
        out[i, :th, tw:].fill_(fill)
    return out


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, h, w) images -> (B, 3, H, W) padded with 0 at the bottom/right, channels-last in memory.

    Decoded images are (3, h, w) views of interleaved (h, w, 3) memory, so an interleaved batch is filled by plain
    row copies; models take it as is (convolutions accept channels-last input, and on CUDA prefer it).
    """
    return pad_stack([im.permute(1, 2, 0) for im in images], 0).permute(0, 3, 1, 2)


class TaskPipeline:
    """Callable pieces a loader worker runs: `sample(raw) -> record` (decode + augment), `collate(records)`."""

    def __init__(self, task: str, cfg: PipelineConfig, train: bool, classes: Optional[list] = None,
                 reduce_zero: bool = True):
        if task not in ("cls", "seg", "coco", "voc"):
            raise ValueError(f"unknown data task {task!r}; valid: cls, coco, seg, voc")
        self.task, self.train, self.reduce_zero = task, train, reduce_zero
        self.transform = build_transform(task, cfg, train)
        cj = cfg.color_jitter if train else None
        self.jitter = JitterDraw(cj.brightness, cj.contrast, cj.saturation, cj.hue, cj.p) if cj else None
        pm = cfg.photometric if train else None
        self.photometric = PhotoMetricDraw(pm.brightness_delta, tuple(pm.contrast_range), tuple(pm.saturation_range),
                                           pm.hue_delta) if pm else None
        self.label_map: dict = {}
        if task in ("coco", "voc"):
            if not classes:
                raise ValueError(f"{task} shards need the index's class list (write them with mona-dist shards)")
            keys = [c["id"] for c in classes] if task == "coco" else list(classes)
            self.label_map = {k: i + 1 for i, k in enumerate(keys)}  # 0 = background (torchvision)

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        if self.task == "cls":
            return _cls_record(raw, self.train)
        if self.task == "seg":
            return _seg_record(raw, self.train, self.reduce_zero)
        if self.task == "coco":
            return _coco_record(raw, self.train, self.label_map)
        return _voc_record(raw, self.train, self.label_map)

    def sample(self, raw: dict[str, Any]) -> dict[str, Any]:
        record = self.transform(self.decode(raw))
        if self.jitter is not None:
            record["jitter"] = self.jitter()
        if self.photometric is not None:
            record["photometric"] = self.photometric()
        return record

    def collate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._collate(records)
        for key in ("jitter", "photometric"):
            if getattr(self, key) is not None:
                batch[key] = torch.stack([r[key] for r in records])
        return batch

    def _collate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        if self.task == "cls":
            images = stack_images([r["image"].as_subclass(torch.Tensor) for r in records])
            return {"images": images, "labels": torch.tensor([r["label"] for r in records], dtype=torch.int64)}
        if self.task == "seg":
            images = [r["image"].as_subclass(torch.Tensor) for r in records]
            batch = {
                "images": stack_images(images),
                "masks": pad_stack([r["mask"].as_subclass(torch.Tensor) for r in records], IGNORE_INDEX),
                "img_sizes": [tuple(im.shape[-2:]) for im in images],
            }
            if "size" in records[0]:  # CropWindow / DrawFlip: the device resizes (and flips) each window
                batch["sizes"] = [r["size"] for r in records]
                batch["flips"] = torch.tensor([r.get("flip", False) for r in records], dtype=torch.bool)
            if not self.train:
                batch["orig_masks"] = [r["orig_mask"] for r in records]
                batch["orig_size"] = [tuple(r["orig_mask"].shape) for r in records]
            return batch
        targets = []
        for r in records:
            t = {k: v for k, v in r.items() if k not in ("image", "jitter", "photometric")}
            t["boxes"] = r["boxes"].as_subclass(torch.Tensor)
            t.setdefault("size", tuple(r["image"].shape[-2:]))
            if "masks" in r:
                t["masks"] = r["masks"].as_subclass(torch.Tensor)
            targets.append(t)
        return {"images": [r["image"].as_subclass(torch.Tensor) for r in records], "targets": targets}
