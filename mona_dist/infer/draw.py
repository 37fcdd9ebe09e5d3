"""Pictures for a person: a segmentation overlay, detections with names and scores, top-5 bars.

torchvision's `draw_segmentation_masks` / `draw_bounding_boxes` draw on the uint8 source image; the bars are PIL.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct, saturated colours (golden-ratio hues), the same for every image of a run."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.07 + i * 0.618034) % 1.0, 0.85, 0.95))
            for i in range(n)]


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (3, H, W) -> PIL RGB."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def enlarge(image: torch.Tensor, min_side: int = 256) -> tuple[torch.Tensor, int]:
    """A small image scaled up by a whole factor (nearest: pixels stay visible) so captions fit; (image, factor)."""
    factor = max(1, -(-min_side // min(image.shape[-2:])))
    if factor == 1:
        return image, 1
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1), factor


def seg_overlay(image: torch.Tensor, labels: torch.Tensor, names: list[str], alpha: float = 0.5) -> Image.Image:
    """The source image beside it with each predicted class painted in its palette colour, and a legend of the
    classes present."""
    from torchvision.utils import draw_segmentation_masks

    k = len(names)
    image, factor = enlarge(image)
    labels = labels.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    masks = labels[None] == torch.arange(k)[:, None, None]
    painted = draw_segmentation_masks(image, masks, alpha=alpha, colors=palette(k))
    pic = to_pil(torch.cat([image, painted], dim=2))
    present = [i for i in range(k) if bool(masks[i].any())]
    row = 22
    canvas = Image.new("RGB", (pic.width, pic.height + row * len(present) + 6), "white")
    canvas.paste(pic, (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=15)
    colours = palette(k)
    for j, i in enumerate(present):
        y = pic.height + 4 + j * row
        draw.rectangle([6, y, 26, y + row - 6], fill=colours[i])
        draw.text((34, y), f"{names[i]}  {float(masks[i].float().mean()):.0%} of the image", fill="black", font=font)
    return canvas


def label_png(labels: np.ndarray, num_classes: int) -> Image.Image:
    """A label map as a palette PNG: the pixel values are the labels, viewers show the palette's colours."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    colours = [(0, 0, 0)] + palette(max(num_classes, 1))  # index 0 black (ADE20K's "other" when labels are +1)
    flat = [c for rgb in colours[:256] for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    return im


def detections(image: torch.Tensor, boxes: torch.Tensor, captions: list[str], label_ids: list[int],
               num_classes: int, masks: torch.Tensor | None = None) -> Image.Image:
    """Boxes (xyxy, source pixels) with their captions, and instance masks under them when given."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    colours = palette(num_classes)
    picked = [colours[(i - 1) % num_classes] for i in label_ids]
    image, factor = enlarge(image)
    boxes = boxes.float() * factor
    if masks is not None and factor > 1:
        masks = masks.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    if masks is not None and len(masks):
        image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=picked)
    if len(boxes):
        width = max(1, round(min(image.shape[-2:]) / 150))
        # torchvision's default font is PIL's fixed bitmap one (a size needs a font file; none is assumed here)
        image = draw_bounding_boxes(image, boxes, labels=captions, colors=picked, width=width)
    return to_pil(image)


def top5_bars(image: torch.Tensor, names: list[str], probs: list[float]) -> Image.Image:
    """The image (shown at least 224 px high) beside a bar per class, its name and probability."""
    pic = to_pil(enlarge(image, 224)[0])
    bar_w, row = 320, max(pic.height // 6, 28)
    canvas = Image.new("RGB", (pic.width + bar_w + 20, max(pic.height, row * len(names) + 20)), "white")
    canvas.paste(pic, (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=max(12, row // 2))
    x0 = pic.width + 10
    for i, (name, p) in enumerate(zip(names, probs)):
        y = 10 + i * row
        draw.rectangle([x0, y, x0 + round((bar_w - 10) * p), y + row - 6], fill=(70, 130, 220))
        draw.text((x0 + 4, y + 2), f"{name}  {p:.1%}", fill="black", font=font)
    return canvas
