"""`mona-dist shards ...` (write WebDataset shards from real-format sources) and `mona-dist bench-data`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mona_dist.cli_args import DefaultsFormatter


def _sharding(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=float, default=None, metavar="BYTES",
                      help="target bytes per shard; None: 1e8 unless --per-shard is given")
    size.add_argument("--per-shard", type=int, default=None, metavar="N", help="samples per shard instead")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="writer processes (the default is min(4, CPUs))")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def register(sub: argparse._SubParsersAction) -> None:
    shards = sub.add_parser("shards", help="write WebDataset tar shards (+ index) from a data set on disk")
    kinds = shards.add_subparsers(dest="kind", required=True, metavar="FORMAT")
    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    p = kinds.add_parser("imagefolder", help="root/<class>/<image> (classification)", **fmt)
    p.add_argument("--root", required=True, help="folder holding one sub-folder of images per class")
    p.add_argument("--classes", help="file with one class name per line; None: the sorted folder names")
    p.add_argument("--out", required=True, help="output prefix, e.g. shards/train -> shards/train-000000.tar")
    _sharding(p)

    p = kinds.add_parser("coco", help="COCO images + instances JSON (boxes, masks, crowd)", **fmt)
    p.add_argument("--images", required=True, help="image folder, e.g. coco/train2017")
    p.add_argument("--annotations", required=True, help="instances_*.json")
    p.add_argument("--out", required=True, help="output prefix, e.g. shards/train -> shards/train-000000.tar")
    _sharding(p)

    p = kinds.add_parser("ade20k", help="ADE20K images/ + annotations/ label maps", **fmt)
    p.add_argument("--images", required=True, help="e.g. ADEChallengeData2016/images/training")
    p.add_argument("--annotations", required=True, help="e.g. ADEChallengeData2016/annotations/training")
    p.add_argument("--classes", help="objectInfo150.txt or one name per line; None: the one found beside images/")
    p.add_argument("--out", required=True, help="output prefix, e.g. shards/train -> shards/train-000000.tar")
    _sharding(p)

    p = kinds.add_parser("voc", help="Pascal VOC JPEGImages + Annotations, one image-set list", **fmt)
    p.add_argument("--root", required=True, action="append", help="VOCdevkit/VOC2007 (repeat for 07+12)")
    p.add_argument("--image-set", required=True, help="name in ImageSets/Main (trainval, test) or a list file")
    p.add_argument("--classes", help="one name per line; None: the 20 VOC classes")
    p.add_argument("--out", required=True, help="output prefix, e.g. shards/train -> shards/train-000000.tar")
    _sharding(p)

    p = kinds.add_parser("synthetic", help="make a small real-format data set and convert it (tests, demo)", **fmt)
    p.add_argument("--task", required=True, choices=["cls", "ade20k", "seg", "coco", "voc"],
                   help="which kind of data set (seg is ade20k)")
    p.add_argument("--out", required=True, help="writes OUT/source/ and OUT/shards/{train,val}-*.tar")
    p.add_argument("--num-train", type=int, default=200, help="training images")
    p.add_argument("--num-val", type=int, default=50, help="validation images")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (detection/seg vary 75-100 %%)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the images and labels")
    p.add_argument("--per-shard", type=int, default=50, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="writer processes")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    for parser in kinds.choices.values():
        parser.set_defaults(func=write)

    b = sub.add_parser("bench-data", help="images/s of the data pipeline vs raw decode of the same shards", **fmt)
    b.add_argument("--shards", required=True, help="pattern, index file or directory")
    b.add_argument("--task", required=True, choices=["cls", "seg", "coco", "voc"], help="the task whose pipeline runs")
    b.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    b.add_argument("--batches", type=int, default=60, help="timed batches per side")
    b.add_argument("--batch-size", type=int, default=16, help="images per batch")
    b.add_argument("--pipeline", help="YAML file holding a train PipelineConfig; None: the task's recipe")
    b.add_argument("--device", help="where to time the model's preprocessing (jitter, normalisation, detection "
                   "resize); None: cuda if present, else cpu")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=bench)


def _classes(path: str | None) -> list[str] | None:
    from .converters import read_class_file

    return read_class_file(path) if path else None


def write(args: argparse.Namespace) -> int:
    from . import converters, synthetic
    from .writer import write_shards

    progress = not args.no_progress
    if args.kind == "synthetic":
        indexes = synthetic.build(args.task, args.out, num_train=args.num_train, num_val=args.num_val, size=args.size,
                                  seed=args.seed, per_shard=args.per_shard, workers=args.workers, progress=progress)
        for split, index in indexes.items():
            print(f"{args.out}/shards/{split}: {index['total']} samples in {len(index['shards'])} shards")
        return 0
    if args.kind == "imagefolder":
        task, (refs, classes) = "cls", converters.imagefolder(args.root, _classes(args.classes))
    elif args.kind == "coco":
        task, (refs, classes) = "coco", converters.coco(args.images, args.annotations)
    elif args.kind == "ade20k":
        task, (refs, classes) = "seg", converters.ade20k(args.images, args.annotations, args.classes)
    else:
        task, (refs, classes) = "voc", converters.voc(args.root, args.image_set, _classes(args.classes))
    shard_size = args.shard_size if args.shard_size is not None or args.per_shard is not None else 1e8
    index = write_shards(refs, args.out, task=task, classes=classes, shard_size=shard_size, per_shard=args.per_shard,
                         workers=args.workers, progress=progress)
    print(f"{args.out}: {index['total']} samples in {len(index['shards'])} shards, index {args.out}.index.json")
    return 0


def bench(args: argparse.Namespace) -> int:
    from .bench import bench_data

    pipeline = read_pipeline(args.pipeline) if args.pipeline else None
    row = bench_data(args.shards, args.task, workers=args.workers, batches=args.batches, batch_size=args.batch_size,
                     pipeline=pipeline, device=args.device)
    if row.get("warning"):
        print(f"mona-dist bench-data: warning: {row['warning']}", file=sys.stderr)
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{args.task} on {args.shards} ({args.workers} workers, batch {args.batch_size}):")
        print(f"  pipeline {row['pipeline_images_per_s']:.1f} img/s ({row['pipeline_images_per_s_per_worker']:.1f}"
              f"/worker)  raw decode {row['decode_images_per_s']:.1f} img/s  ratio {row['ratio']:.2f}x")
        print(f"  on the device ({row['device']}): preprocessing {row['device_preprocess_images_per_s']:.1f} img/s")
    return 0


def read_pipeline(path: str):
    """A train PipelineConfig from a YAML file; any problem is one line naming the file (and the key)."""
    import yaml
    from pydantic import ValidationError

    from .config import PipelineConfig

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ValueError(f"--pipeline {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ValueError(f"--pipeline {path}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    try:
        return PipelineConfig.model_validate(data if data is not None else {})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ValueError(f"--pipeline {path}: {key}: {msg}") from None
