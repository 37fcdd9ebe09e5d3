"""Read real-format sources (ImageFolder, COCO, ADE20K, Pascal VOC) into `SampleRef`s for the shard writer.

Every sample keeps its original image bytes (no re-encoding) and its raw annotations, so the shards are a lossless
repackaging of the source: tests compare them back against it.

Members per sample:
  imagefolder  <key>.jpg|png  <key>.cls (label index)  <key>.json {"label", "class", "file"}
  coco         <key>.jpg      <key>.json {"image": raw COCO image record, "annotations": [raw records]}
  ade20k       <key>.jpg      <key>.png (raw label map, 0 = other)  <key>.json {"file", "image_id"}
  voc          <key>.jpg      <key>.json {"id", "image_id", "filename", "size", "objects": [{name, bbox, ...}]}
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from typing import Any, Optional

from .writer import SampleRef

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def _ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _need_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} is not a directory: {path}")


def read_class_file(path: str) -> list[str]:
    """One name per line, or ADE20K's objectInfo150.txt (tab-separated, header 'Idx ... Name', 'a;b' synonyms)."""
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if lines and lines[0].split("\t")[0].strip().lower() == "idx":
        return [line.split("\t")[-1].split(";")[0].strip() for line in lines[1:]]
    return [line.strip() for line in lines]


def imagefolder(root: str, classes: Optional[list[str]] = None) -> tuple[list[SampleRef], list[str]]:
    """`root/<class>/<image>`; classes default to the sorted sub-directory names (torchvision's rule)."""
    _need_dir(root, "imagefolder root")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = list(classes) if classes else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folders not in the class list: {', '.join(unknown)}")
    refs = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS)) if os.path.isdir(folder) else []
        for fname in files:
            key = f"{len(refs):08d}"
            info = {"label": label, "class": name, "file": f"{name}/{fname}"}
            refs.append(SampleRef(key, {_ext(fname): os.path.join(folder, fname)}, {"cls": str(label), "json": info}))
    return refs, classes


def _outside(box_xyxy: list[float], width: float, height: float) -> bool:
    """A box of positive size that has none left once clamped to its image (as the pipelines clamp it)."""
    x0, y0, x1, y1 = box_xyxy
    if x1 <= x0 or y1 <= y0 or not (width and height):
        return False  # degenerate in the source: the pipelines drop it (COCO: w or h < 1), as mmdet does
    return min(x1, width) <= max(x0, 0) or min(y1, height) <= max(y0, 0)


def coco(images: str, annotations: str) -> tuple[list[SampleRef], list[dict[str, Any]]]:
    """One sample per image record, with all of that image's raw annotation records; classes = sorted categories.
    Refused in one line: a category id not in `categories`, a box wholly outside its image."""
    _need_dir(images, "COCO images")
    with open(annotations) as f:
        data = json.load(f)
    known = {c["id"] for c in data["categories"]}
    sizes = {img["id"]: (img.get("width", 0), img.get("height", 0)) for img in data["images"]}
    by_image: dict[int, list] = {}
    for ann in data.get("annotations", []):
        if ann["category_id"] not in known:
            raise ValueError(f"{annotations}: annotation {ann.get('id')} (image {ann['image_id']}) has category_id "
                             f"{ann['category_id']}, which is not in its categories ({len(known)} ids, "
                             f"{min(known, default=None)}..{max(known, default=None)})")
        x, y, w, h = ann["bbox"]
        if _outside([x, y, x + w, y + h], *sizes.get(ann["image_id"], (0, 0))):
            raise ValueError(f"{annotations}: annotation {ann.get('id')} (image {ann['image_id']}, "
                             f"{'x'.join(map(str, sizes[ann['image_id']]))}) has bbox {ann['bbox']} outside the "
                             f"image: clamped to it, its area is zero")
        by_image.setdefault(ann["image_id"], []).append(ann)
    refs = []
    for img in sorted(data["images"], key=lambda r: r["id"]):
        path = os.path.join(images, img["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{annotations}: image {img['file_name']} not found in {images}")
        payload = {"json": {"image": img, "annotations": by_image.get(img["id"], [])}}
        refs.append(SampleRef(f"{img['id']:012d}", {_ext(path): path}, payload))
    classes = [{"id": c["id"], "name": c["name"]} for c in sorted(data["categories"], key=lambda c: c["id"])]
    return refs, classes


def ade20k(
    images: str, annotations: str, classes_file: Optional[str] = None
) -> tuple[list[SampleRef], Optional[list[str]]]:
    """`images/<stem>.jpg` paired with `annotations/<stem>.png`; class names from objectInfo150.txt if present."""
    _need_dir(images, "ADE20K images")
    _need_dir(annotations, "ADE20K annotations")
    if classes_file is None:
        for up in (("..", ".."), ("..",)):  # ADEChallengeData2016/objectInfo150.txt beside images/
            cand = os.path.join(images, *up, "objectInfo150.txt")
            if os.path.isfile(cand):
                classes_file = cand
                break
    classes = read_class_file(classes_file) if classes_file else None
    refs = []
    for fname in sorted(f for f in os.listdir(images) if f.lower().endswith(IMAGE_EXTS)):
        stem = os.path.splitext(fname)[0]
        label = os.path.join(annotations, stem + ".png")
        if not os.path.isfile(label):
            raise FileNotFoundError(f"ADE20K: no label map {label} for image {fname}")
        if classes:
            _check_label_values(label, len(classes))
        payload = {"json": {"file": fname, "image_id": len(refs)}}
        refs.append(SampleRef(f"{len(refs):08d}", {"jpg": os.path.join(images, fname), "png": label}, payload))
    return refs, classes


def _check_label_values(path: str, num_classes: int, ignore: int = 255) -> None:
    """ADE20K's raw maps: 0 is "other", 1..num_classes the classes, `ignore` (255) ignored; anything else would
    reach the loss as a class the model does not have."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        values = np.unique(np.asarray(im))
    bad = values[(values > num_classes) & (values != ignore)]
    if bad.size:
        raise ValueError(f"ADE20K: label map {path} holds value {int(bad.max())}, above the {num_classes} classes "
                         f"of the class list (0 = other, {ignore} = ignore)")


def parse_voc_xml(path: str) -> dict[str, Any]:
    """A VOC annotation as plain data: filename, size, objects (name, bbox [xmin, ymin, xmax, ymax] 1-based)."""
    root = ET.parse(path).getroot()

    def num(node, tag, cast=float, default=0):
        child = node.find(tag)
        return cast(float(child.text)) if child is not None and child.text else default

    size = root.find("size")
    objects = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        objects.append({
            "name": obj.findtext("name").strip(),
            "bbox": [num(box, t) for t in ("xmin", "ymin", "xmax", "ymax")],
            "difficult": bool(num(obj, "difficult", int)),
            "truncated": bool(num(obj, "truncated", int)),
        })
    return {
        "filename": root.findtext("filename"),
        "size": {k: num(size, k, int) for k in ("width", "height", "depth")},
        "objects": objects,
    }


def voc(roots: list[str], image_set: str, classes: Optional[list[str]] = None) -> tuple[list[SampleRef], list[str]]:
    """Images listed in `<root>/ImageSets/Main/<image_set>.txt` of each root (VOC07+12 = two roots)."""
    classes = list(classes) if classes else list(VOC_CLASSES)
    refs = []
    for root in roots:
        listing = image_set
        if not os.path.isfile(listing):
            listing = os.path.join(root, "ImageSets", "Main", image_set + ".txt")
        if not os.path.isfile(listing):
            raise FileNotFoundError(f"VOC image-set list not found: {listing}")
        with open(listing) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        for image_id in ids:
            ann = parse_voc_xml(os.path.join(root, "Annotations", image_id + ".xml"))
            bad = sorted({o["name"] for o in ann["objects"]} - set(classes))
            if bad:
                raise ValueError(f"VOC {image_id}: object classes not in the class list: {', '.join(bad)}")
            for o in ann["objects"]:  # 1-based pixel boxes, as the pipeline reads them
                x0, y0, x1, y1 = o["bbox"]
                if _outside([x0 - 1, y0 - 1, x1, y1], ann["size"]["width"], ann["size"]["height"]):
                    raise ValueError(f"VOC {image_id}: {o['name']} box {o['bbox']} lies outside the "
                                     f"{ann['size']['width']}x{ann['size']['height']} image: clamped to it, its "
                                     f"area is zero")
            path = os.path.join(root, "JPEGImages", ann["filename"] or image_id + ".jpg")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"VOC image not found: {path}")
            payload = {"json": {"id": image_id, "image_id": len(refs), **ann}}
            refs.append(SampleRef(f"{len(refs):08d}", {"jpg": path}, payload))
    return refs, classes
