"""Synthetic data sets in the *real* source formats, so tests and the demo run the converters a user runs.

Content is learnable: coloured shapes on noisy backgrounds, class = shape + colour, masks = the shape's pixels.
Everything is a function of the seed (one numpy generator per image), small, and fast to make.

Layouts written under `<out>/source/`:
  cls     train/<class>/*.jpg, val/<class>/*.jpg                                   (ImageFolder)
  coco    images/{train,val}2017/*.jpg, annotations/instances_{train,val}2017.json (polygons; some crowd RLE)
  ade20k  images/{training,validation}/*.jpg, annotations/{...}/*.png, objectInfo150.txt (0 = other)
  voc     VOCdevkit/VOC2012/{JPEGImages, Annotations, ImageSets/Main/{train,val}.txt}, classes.txt
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = (  # class = shape, drawn in its own colour (jittered per object)
    ("circle", (220, 40, 40)),
    ("square", (40, 200, 40)),
    ("triangle", (40, 80, 230)),
    ("diamond", (230, 210, 40)),
)
CLASS_NAMES = [shape for shape, _ in SHAPES]
COCO_CATEGORY_IDS = (2, 5, 7, 11)  # non-contiguous on purpose, like COCO's 1..90 with gaps
ADE_STUFF = ("wall", "floor")  # ADE label 1, 2; shapes follow as 3..; 0 = other (ignored after reduce_zero_label)
SPLITS = {"train": 0, "val": 1}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return list(zip(cx + r * np.cos(t), cy + r * np.sin(t)))
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.integers(70, 150, size=3)
    img = base + rng.normal(0, 18, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _apart(a: dict, b: dict) -> bool:
    return float(np.hypot(a["c"][0] - b["c"][0], a["c"][1] - b["c"][1])) > a["r"] + b["r"] + 2


def _scene(rng: np.random.Generator, h: int, w: int, max_objects: int, rmin: float, rmax: float) -> list[dict]:
    """Non-overlapping shapes (rejection sampling), each {cls, poly} with the polygon inside the image."""
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            r = float(rng.uniform(rmin, rmax) * min(h, w))
            cx, cy = float(rng.uniform(r + 1, w - r - 1)), float(rng.uniform(r + 1, h - r - 1))
            new = {"c": (cx, cy), "r": r}
            if all(_apart(new, o) for o in objects):
                cls = int(rng.integers(len(SHAPES)))
                objects.append({**new, "cls": cls, "poly": _polygon(SHAPES[cls][0], cx, cy, r)})
                break
    return objects


def _draw(img: np.ndarray, objects: list[dict], rng: np.random.Generator, label: np.ndarray | None = None,
          label_of=lambda o: 0) -> Image.Image:
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    lab = Image.fromarray(label) if label is not None else None
    for o in objects:
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in SHAPES[o["cls"]][1])
        draw.polygon(o["poly"], fill=colour)
        if lab is not None:
            ImageDraw.Draw(lab).polygon(o["poly"], fill=label_of(o))
    if label is not None:
        label[...] = np.asarray(lab)
    return pil


def _size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    return int(size * rng.uniform(0.75, 1.0)), int(size * rng.uniform(0.75, 1.0))


def _rng(seed: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], i])


def make_cls(root: str, split: str, n: int, size: int, seed: int) -> None:
    for i in range(n):
        rng = _rng(seed, split, i)
        img = _background(rng, size, size)
        cls = i % len(SHAPES)  # balanced classes
        r = float(rng.uniform(0.22, 0.38) * size)
        c = rng.uniform(r + 1, size - r - 1, size=2)
        objects = [{"cls": cls, "poly": _polygon(SHAPES[cls][0], c[0], c[1], r)}]
        folder = os.path.join(root, split, CLASS_NAMES[cls])
        os.makedirs(folder, exist_ok=True)
        _draw(img, objects, rng).save(os.path.join(folder, f"img_{i:05d}.jpg"), quality=90)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE (column-major runs, starting with zeros), as real crowd annotations store it."""
    flat = np.asfortranarray(mask).reshape(-1, order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def make_coco(root: str, split: str, n: int, size: int, seed: int) -> None:
    from pycocotools import mask as mask_utils

    folder = os.path.join(root, "images", f"{split}2017")
    os.makedirs(folder, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        rng = _rng(seed, split, i)
        h, w = _size(rng, size)
        objects = _scene(rng, h, w, 3, 0.1, 0.22)
        image_id = 1000 * (SPLITS[split] + 1) + i
        small: list[dict] = []
        if i % 7 == 3:  # a crowd of small same-class shapes, annotated as one RLE region like COCO's crowds
            small = _scene(rng, h, w, 6, 0.05, 0.07)
            for o in small:
                o["cls"] = small[0]["cls"]
                o["poly"] = _polygon(SHAPES[o["cls"]][0], *o["c"], o["r"])
            objects = [o for o in objects if all(_apart(o, s) for s in small)]
        pil = _draw(_background(rng, h, w), objects + small, rng)
        fname = f"{image_id:012d}.jpg"
        pil.save(os.path.join(folder, fname), quality=90)
        images.append({"id": image_id, "file_name": fname, "height": h, "width": w})
        for o in objects:
            seg = [round(v, 2) for xy in o["poly"] for v in xy]
            rle = mask_utils.frPyObjects([seg], h, w)
            x, y, bw, bh = mask_utils.toBbox(rle)[0].tolist()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[o["cls"]],
                         "segmentation": [seg], "area": float(mask_utils.area(rle).sum()),
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)], "iscrowd": 0})
        if small:
            m = Image.new("L", (w, h), 0)
            for s in small:
                ImageDraw.Draw(m).polygon(s["poly"], fill=1)
            rle = _rle(np.asarray(m))
            enc = mask_utils.frPyObjects(rle, h, w)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[small[0]["cls"]],
                         "segmentation": rle, "area": float(mask_utils.area(enc)),
                         "bbox": [round(v, 2) for v in mask_utils.toBbox(enc).tolist()], "iscrowd": 1})
    categories = [{"id": cid, "name": name, "supercategory": "shape"}
                  for cid, name in zip(COCO_CATEGORY_IDS, CLASS_NAMES)]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)


def make_ade20k(root: str, split: str, n: int, size: int, seed: int) -> None:
    sub = {"train": "training", "val": "validation"}[split]
    img_dir, ann_dir = os.path.join(root, "images", sub), os.path.join(root, "annotations", sub)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    for i in range(n):
        rng = _rng(seed, split, i)
        h, w = _size(rng, size)
        horizon = int(h * rng.uniform(0.4, 0.7))
        img = _background(rng, h, w)
        img[horizon:] = np.clip(img[horizon:].astype(int) + (40, 10, -30), 0, 255).astype(np.uint8)  # floor tint
        label = np.full((h, w), 1, np.uint8)
        label[horizon:] = 2
        for _ in range(int(rng.integers(0, 3))):  # unlabeled blobs: ADE's 0 = "other"
            y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
            label[y : y + 4, x : x + 4] = 0
        objects = _scene(rng, h, w, 3, 0.1, 0.2)
        pil = _draw(img, objects, rng, label, label_of=lambda o: 1 + len(ADE_STUFF) + o["cls"])
        stem = f"ADE_{sub[:-3] if sub == 'training' else 'val'}_{i + 1:08d}"
        pil.save(os.path.join(img_dir, stem + ".jpg"), quality=90)
        Image.fromarray(label, mode="L").save(os.path.join(ann_dir, stem + ".png"))
    names = list(ADE_STUFF) + CLASS_NAMES
    with open(os.path.join(root, "objectInfo150.txt"), "w") as f:
        f.write("Idx\tRatio\tTrain\tVal\tName\n")
        f.writelines(f"{k + 1}\t0\t0\t0\t{name}\n" for k, name in enumerate(names))


def make_voc(root: str, split: str, n: int, size: int, seed: int) -> None:
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    for d in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, d), exist_ok=True)
    ids = []
    for i in range(n):
        rng = _rng(seed, split, i)
        h, w = _size(rng, size)
        objects = _scene(rng, h, w, 3, 0.08, 0.22)
        image_id = f"2012_{SPLITS[split]}{i:05d}"
        ids.append(image_id)
        _draw(_background(rng, h, w), objects, rng).save(os.path.join(voc, "JPEGImages", image_id + ".jpg"), quality=90)
        objs = []
        for o in objects:
            xs, ys = [p[0] for p in o["poly"]], [p[1] for p in o["poly"]]
            # VOC boxes are 1-based inclusive pixel indices
            box = (max(1, round(min(xs)) + 1), max(1, round(min(ys)) + 1),
                   min(w, round(max(xs)) + 1), min(h, round(max(ys)) + 1))
            difficult = int(o["r"] < 0.1 * min(h, w))  # the smallest shapes, as VOC marks hard objects
            objs.append(
                f"<object><name>{CLASS_NAMES[o['cls']]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                f"<difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
                f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
            )
        xml = (f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename><size><width>{w}</width>"
               f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{''.join(objs)}</annotation>")
        with open(os.path.join(voc, "Annotations", image_id + ".xml"), "w") as f:
            f.write(xml)
    with open(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    with open(os.path.join(voc, "classes.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")


MAKERS = {"cls": make_cls, "coco": make_coco, "ade20k": make_ade20k, "voc": make_voc}


def make_source(task: str, root: str, *, num_train: int, num_val: int, size: int, seed: int) -> None:
    """Write both splits of the task's real-format source under `root`."""
    if task not in MAKERS:
        raise ValueError(f"unknown synthetic task {task!r}; valid: {', '.join(sorted(MAKERS))}")
    if size < 32:
        raise ValueError(f"--size must be >= 32 pixels, got {size}")
    for split, n in (("train", num_train), ("val", num_val)):
        MAKERS[task](root, split, n, size, seed)


LOADER_TASK = {"cls": "cls", "coco": "coco", "ade20k": "seg", "voc": "voc"}


def source_refs(task: str, src: str, split: str):
    """The converter call a user would make on this layout: (refs, classes)."""
    from . import converters

    if task == "cls":
        return converters.imagefolder(os.path.join(src, split), classes=CLASS_NAMES)
    if task == "coco":
        return converters.coco(os.path.join(src, "images", f"{split}2017"),
                               os.path.join(src, "annotations", f"instances_{split}2017.json"))
    if task == "ade20k":
        sub = {"train": "training", "val": "validation"}[split]
        return converters.ade20k(os.path.join(src, "images", sub), os.path.join(src, "annotations", sub))
    voc = os.path.join(src, "VOCdevkit", "VOC2012")
    return converters.voc([voc], split, classes=converters.read_class_file(os.path.join(voc, "classes.txt")))


def build(task: str, out: str, *, num_train: int = 200, num_val: int = 50, size: int = 96, seed: int = 0,
          per_shard: int = 50, workers: int = 1, progress: bool = False) -> dict[str, dict]:
    """`<out>/source/` (real format) + `<out>/shards/{train,val}-NNNNNN.tar` and their index files.

    The source is regenerated only when the parameters changed; the writer skips shards already finished.
    """
    task = "ade20k" if task == "seg" else task
    src = os.path.join(out, "source")
    params = {"task": task, "num_train": num_train, "num_val": num_val, "size": size, "seed": seed}
    marker = os.path.join(src, "synthetic.json")
    if not (os.path.exists(marker) and json.load(open(marker)) == params):
        if os.path.exists(marker):
            import shutil

            shutil.rmtree(src)
        make_source(task, src, num_train=num_train, num_val=num_val, size=size, seed=seed)
        with open(marker, "w") as f:
            json.dump(params, f)
    from .writer import write_shards

    indexes = {}
    for split in ("train", "val"):
        refs, classes = source_refs(task, src, split)
        indexes[split] = write_shards(refs, os.path.join(out, "shards", split), task=LOADER_TASK[task],
                                      classes=classes, per_shard=per_shard, workers=workers, progress=progress)
    return indexes
