"""`mona-dist predict`: per image a prediction file and a picture, through the task's eval pipeline.

Each image is decoded as the shards' images are (torchvision, RGB), goes through the eval pipeline's transform and
collate (`data.pipelines.TaskPipeline`, same resize and crop; the model normalises), and the model's eval output is
mapped back to the source pixels as its evaluation does (seg: logits cropped, resized, argmax; coco/voc: mmdet's
rescale by `orig_size`). Outputs per image `<name>`:

    cls   <name>.json      top-5 [{"label", "name", "prob"}]             <name>.vis.png  the image beside bars
    seg   <name>.png       label map at the source size (palette PNG)   <name>.vis.png  image | overlay
    coco  <name>.json      COCO results records (RLE masks)             <name>.vis.png  masks, boxes, names
    voc   <name>.json      [{"box" xyxy, "score", "label", "name"}]     <name>.vis.png  boxes, names
plus images.json (name, file, image_id, source size) and, for coco, coco_results.json with every image's records.
Seg label maps hold the data set's own labels: with data.reduce_zero_label (ADE20K) the model's class k is k+1.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mona_dist.config import Config

from mona_dist.data.pipelines import IMAGE_KEYS, decode_rgb_bytes

IMAGE_SUFFIXES = {f".{key}" for key in IMAGE_KEYS}  # the formats a shard's image member may have


def list_images(spec: str) -> list[Path]:
    """The image files of a directory (sorted, not recursive) or of a glob pattern."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise FileNotFoundError(f"--images {spec}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in "
                                    f"that directory")
        return found
    found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not found:
        what = "no such directory, and the pattern matches no file" if not glob.has_magic(spec) else \
            "the pattern matches no file"
        raise FileNotFoundError(f"--images {spec}: {what}")
    return found


def read_image(path: Path) -> torch.Tensor:
    """uint8 (3, H, W), decoded as the loader decodes shard images; a broken file is one line naming it."""
    try:
        return decode_rgb_bytes(path.read_bytes())
    except (RuntimeError, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path}: not a readable image ({first})") from None


def record(task: str, image: torch.Tensor, image_id: int) -> dict[str, Any]:
    """What the pipeline's decode step makes of a shard sample, without labels (empty targets)."""
    from torchvision import tv_tensors

    h, w = image.shape[-2:]
    rec: dict[str, Any] = {"image": tv_tensors.Image(image)}
    if task == "cls":
        return rec | {"label": 0}
    if task == "seg":
        return rec | {"mask": tv_tensors.Mask(torch.zeros((h, w), dtype=torch.uint8)),
                      "orig_mask": torch.zeros((h, w), dtype=torch.int64)}
    rec |= {"boxes": tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY", canvas_size=(h, w)),
            "labels": torch.zeros(0, dtype=torch.int64), "image_id": image_id, "orig_size": (int(h), int(w))}
    if task == "coco":
        return rec | {"masks": tv_tensors.Mask(torch.zeros((0, h, w), dtype=torch.uint8)),
                      "iscrowd": torch.zeros(0, dtype=torch.bool), "area": torch.zeros(0)}
    return rec | {"difficult": torch.zeros(0, dtype=torch.bool)}


def class_list(cfg: Config) -> list | None:
    """The shards' class list (val, else train index), as the loaders map labels; None when neither has one."""
    from mona_dist.data import resolve_shards

    for spec in (cfg.data.val_shards, cfg.data.train_shards):
        if spec:
            try:
                classes = resolve_shards(spec).classes
            except (FileNotFoundError, ValueError):
                continue
            if classes:
                return list(classes)
    return None


def unique_names(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        out.append(p.stem if n == 0 else f"{p.stem}-{n}")
    return out


@torch.no_grad()
def predict(cfg: Config, checkpoint: str, images: str, out: str, score_thresh: float = 0.3) -> list[dict]:
    """Predict every image of `images` with the checkpoint; returns images.json's entries."""
    from mona_dist.data.pipelines import TaskPipeline
    from mona_dist.infer.restore import restore

    paths = list_images(images)
    for p in paths:  # a broken file fails now, in a second, not after building the model
        read_image(p)
    out_dir = Path(out)
    if out_dir.resolve() == Path(cfg.output_dir).resolve():
        raise ValueError(f"--out {out} is the run's output_dir; predictions go elsewhere")
    r = restore(cfg, checkpoint)
    if r.dist.world_size > 1:
        raise ValueError("predict runs in one process; start it without a launcher")
    task, classes = r.cfg.task, class_list(r.cfg)
    pipeline = TaskPipeline(task, r.cfg.data.pipeline(task, "val"), False, classes or _placeholder(task),
                            r.cfg.data.reduce_zero_label)
    out_dir.mkdir(parents=True, exist_ok=True)
    for note in r.notes:
        print(note, flush=True)
    writer = Outputs(task, out_dir, classes, r.cfg, score_thresh)
    index = []
    for i, (path, name) in enumerate(zip(paths, unique_names(paths))):
        image = read_image(path)
        batch = pipeline.collate([pipeline.transform(record(pipeline.task, image, i))])
        result = r.engine(batch)
        writer.write(name, image, result, image_id=i)
        index.append({"name": name, "file": str(path), "image_id": i, "height": int(image.shape[1]),
                      "width": int(image.shape[2])})
    (out_dir / "images.json").write_text(json.dumps(index, indent=1) + "\n")
    writer.close()
    print(f"predict: {len(paths)} image(s) with {r.checkpoint} (step {r.step}); outputs in {out_dir}", flush=True)
    return index


def _placeholder(task: str) -> list | None:
    """Detection pipelines need a class list to map labels; with none, labels stand for themselves."""
    return [{"id": 0, "name": "0"}] if task == "coco" else (["0"] if task == "voc" else None)


class Outputs:
    """Writes one image's prediction file and picture, per task (module docstring)."""

    def __init__(self, task: str, out: Path, classes: list | None, cfg: Config, score_thresh: float):
        self.task, self.out, self.classes, self.score_thresh = task, out, classes, score_thresh
        self.num_classes = cfg.model.num_classes or (len(classes) if classes else 1)
        self.label_offset = 1 if task == "seg" and cfg.data.reduce_zero_label else 0
        self.coco: list[dict] = []

    def name_of(self, label: int) -> str:
        """Class name of a model label (cls/seg: 0..K-1; coco/voc: 1..K)."""
        i = label - 1 if self.task in ("coco", "voc") else label
        if self.classes and 0 <= i < len(self.classes):
            c = self.classes[i]
            return str(c["name"]) if isinstance(c, dict) else str(c)
        return str(label)

    def write(self, name: str, image: torch.Tensor, result: Any, image_id: int) -> None:
        from mona_dist.infer import draw

        if self.task == "cls":
            probs = result["logits"].float().softmax(-1)[0].cpu()
            top = probs.topk(min(5, probs.numel()))
            rows = [{"label": int(k), "name": self.name_of(int(k)), "prob": float(p)}
                    for p, k in zip(top.values, top.indices)]
            self._json(name, rows)
            pic = draw.top5_bars(image, [r["name"] for r in rows], [r["prob"] for r in rows])
        elif self.task == "seg":
            labels = result[0].cpu()
            draw.label_png(labels.numpy() + self.label_offset, self.num_classes).save(self.out / f"{name}.png")
            pic = draw.seg_overlay(image, labels, [self.name_of(i) for i in range(self.num_classes)])
        else:
            pred = {k: v.cpu() for k, v in result[0].items()}
            pic = self._detections(name, image, pred, image_id)
        pic.save(self.out / f"{name}.vis.png")

    def _detections(self, name: str, image: torch.Tensor, pred: dict, image_id: int):
        from mona_dist.infer import draw

        if self.task == "coco":
            from mona_dist.tasks.coco import to_coco_results

            ids = [c["id"] for c in self.classes] if self.classes else list(range(1, self.num_classes + 1))
            recs = to_coco_results(pred, image_id, ids)
            self.coco += recs
            self._json(name, recs)
        else:
            self._json(name, [{"box": [float(v) for v in b], "score": float(s), "label": int(k),
                               "name": self.name_of(int(k))}
                              for b, s, k in zip(pred["boxes"], pred["scores"], pred["labels"])])
        keep = pred["scores"] >= self.score_thresh
        labels = [int(k) for k in pred["labels"][keep]]
        captions = [f"{self.name_of(k)} {float(s):.2f}" for k, s in zip(labels, pred["scores"][keep])]
        masks = pred["masks"][keep] if "masks" in pred else None
        return draw.detections(image, pred["boxes"][keep], captions, labels, self.num_classes, masks)

    def _json(self, name: str, obj: Any) -> None:
        (self.out / f"{name}.json").write_text(json.dumps(obj) + "\n")

    def close(self) -> None:
        if self.task == "coco":
            (self.out / "coco_results.json").write_text(json.dumps(self.coco) + "\n")
