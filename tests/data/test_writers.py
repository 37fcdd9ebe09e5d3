"""Every writer round-trips its source exactly; shard plans, index files and re-runs behave."""

from __future__ import annotations

import json
import os
import tarfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from mona_dist.data import converters
from mona_dist.data.index import read_index, resolve_shards
from mona_dist.data.wds_compat import SkipCounter, iter_shard
from mona_dist.data.writer import plan_shards, write_shards

NUM_TRAIN, NUM_VAL = 24, 9  # tests/data/conftest.py


def samples(out: str, split: str) -> list[dict]:
    shards = resolve_shards(os.path.join(out, "shards", f"{split}.index.json"))
    got = [s for url in shards.urls for s in iter_shard(url, skips=SkipCounter())]
    assert len(got) == shards.total
    return got


def test_index_lists_counts_and_classes(synth):
    out = synth("coco")
    index = read_index(os.path.join(out, "shards", "train.index.json"))
    assert index["complete"] and index["total"] == NUM_TRAIN
    assert [s["count"] for s in index["shards"]] == [7, 7, 7, 3]
    assert index["classes"] == [{"id": 2, "name": "circle"}, {"id": 5, "name": "square"},
                                {"id": 7, "name": "triangle"}, {"id": 11, "name": "diamond"}]
    assert os.path.exists(os.path.join(out, "shards", "val-000001.tar"))


def test_imagefolder_round_trip(synth):
    out = synth("cls")
    for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        got = samples(out, split)
        assert len(got) == n
        classes = sorted(os.listdir(os.path.join(out, "source", split)))
        for s in got:
            info = json.loads(s["json"])
            src = os.path.join(out, "source", split, info["file"])
            assert int(s["cls"]) == info["label"] == ["circle", "square", "triangle", "diamond"].index(info["class"])
            assert info["class"] == info["file"].split("/")[0] and info["class"] in classes
            assert s["jpg"] == open(src, "rb").read()


def test_coco_round_trip_masks_boxes_labels(synth):
    from pycocotools.coco import COCO

    out = synth("coco")
    for split in ("train", "val"):
        api = COCO(os.path.join(out, "source", "annotations", f"instances_{split}2017.json"))
        got = samples(out, split)
        assert sorted(json.loads(s["json"])["image"]["id"] for s in got) == sorted(api.getImgIds())
        crowd = 0
        for s in got:
            meta = json.loads(s["json"])
            image_id = meta["image"]["id"]
            assert meta["image"] == api.imgs[image_id]
            source = api.loadAnns(api.getAnnIds(imgIds=[image_id]))
            assert [a["id"] for a in meta["annotations"]] == [a["id"] for a in source]
            for ann, ref in zip(meta["annotations"], source):
                for field in ("bbox", "category_id", "iscrowd", "area", "image_id"):
                    assert ann[field] == ref[field]
                assert np.array_equal(api.annToMask(ann), api.annToMask(ref))
                assert api.annToMask(ann).sum() > 0
                crowd += ann["iscrowd"]
            path = os.path.join(out, "source", "images", f"{split}2017", meta["image"]["file_name"])
            assert s["jpg"] == open(path, "rb").read()
        assert crowd > 0  # the RLE path was exercised


def test_ade20k_round_trip_label_maps_pixel_exact(synth):
    out = synth("ade20k")
    got = samples(out, "train")
    for s in got:
        name = json.loads(s["json"])["file"]
        stem = os.path.splitext(name)[0]
        ref = np.asarray(Image.open(os.path.join(out, "source", "annotations", "training", stem + ".png")))
        mine = np.asarray(Image.open(__import__("io").BytesIO(s["png"])))
        assert mine.dtype == ref.dtype and np.array_equal(mine, ref)
        assert s["jpg"] == open(os.path.join(out, "source", "images", "training", name), "rb").read()
    index = read_index(os.path.join(out, "shards", "train.index.json"))
    assert index["classes"] == ["wall", "floor", "circle", "square", "triangle", "diamond"]


def test_voc_round_trip_boxes(synth):
    out = synth("voc")
    voc = os.path.join(out, "source", "VOCdevkit", "VOC2012")
    ids = open(os.path.join(voc, "ImageSets", "Main", "val.txt")).read().split()
    got = samples(out, "val")
    assert [json.loads(s["json"])["id"] for s in got] == ids
    difficult = 0
    for s in got:
        meta = json.loads(s["json"])
        root = ET.parse(os.path.join(voc, "Annotations", meta["id"] + ".xml")).getroot()
        ref = [(o.find("name").text, [float(o.find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")],
                o.find("difficult").text == "1") for o in root.iter("object")]
        assert [(o["name"], o["bbox"], o["difficult"]) for o in meta["objects"]] == ref
        assert meta["size"]["width"] == int(root.find("size").find("width").text)
        difficult += sum(o["difficult"] for o in meta["objects"])
    assert difficult > 0


def test_rerun_skips_finished_shards(synth, tmp_path):
    refs, classes = converters.imagefolder(os.path.join(synth("cls"), "source", "train"))
    prefix = str(tmp_path / "train")
    write_shards(refs, prefix, task="cls", classes=classes, per_shard=5, workers=2, progress=False)
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith(".tar"))
    assert len(names) == 5
    stamp = {n: os.stat(tmp_path / n).st_mtime_ns for n in names}
    # Simulate a run killed before shard 3 finished: its file is gone and the index does not list it.
    os.remove(tmp_path / names[3])
    index = read_index(prefix + ".index.json")
    index["shards"] = [s for s in index["shards"] if s["name"] != names[3]]
    json.dump(index, open(prefix + ".index.json", "w"))
    again = write_shards(refs, prefix, task="cls", classes=classes, per_shard=5, workers=1, progress=False)
    assert again["complete"] and again["total"] == len(refs)
    for n in names:
        if n != names[3]:
            assert os.stat(tmp_path / n).st_mtime_ns == stamp[n], f"{n} was rewritten"
    assert os.path.exists(tmp_path / names[3])
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_shard_size_target_in_bytes(synth, tmp_path):
    refs, classes = converters.imagefolder(os.path.join(synth("cls"), "source", "train"))
    target = 6 * refs[0].estimated_bytes()
    plan = plan_shards(refs, target, None)
    assert len(plan) > 2 and sum(map(len, plan)) == len(refs)
    index = write_shards(refs, str(tmp_path / "s"), task="cls", classes=classes, shard_size=target, progress=False)
    for entry in index["shards"][:-1]:
        assert entry["bytes"] >= 0.5 * target and entry["bytes"] <= 2 * target
    with tarfile.open(tmp_path / "s-000000.tar") as tar:
        assert tar.getnames()[:3] == ["00000000.cls", "00000000.jpg", "00000000.json"]
    with pytest.raises(ValueError, match="exactly one"):
        plan_shards(refs, 1e8, 10)


def _copy_source(synth, task: str, tmp_path) -> str:
    import shutil

    src = str(tmp_path / "source")
    shutil.copytree(os.path.join(synth(task), "source"), src)
    return src


def test_ade20k_label_values_above_the_class_list_are_refused(synth, tmp_path):
    src = _copy_source(synth, "ade20k", tmp_path)
    images, labels = os.path.join(src, "images", "training"), os.path.join(src, "annotations", "training")
    name = sorted(os.listdir(labels))[3]
    mask = np.asarray(Image.open(os.path.join(labels, name))).copy()
    mask[0, :3] = [7, 255, 0]  # 6 classes: 7 is none of them; 255 (ignore) and 0 (other) are fine
    Image.fromarray(mask).save(os.path.join(labels, name))
    with pytest.raises(ValueError, match=f"label map .*{name} holds value 7, above the 6 classes"):
        converters.ade20k(images, labels)
    mask[0, 0] = 6
    Image.fromarray(mask).save(os.path.join(labels, name))
    assert len(converters.ade20k(images, labels)[0]) == NUM_TRAIN


def test_coco_unknown_categories_and_boxes_outside_the_image_are_refused(synth, tmp_path):
    src = _copy_source(synth, "coco", tmp_path)
    images, path = os.path.join(src, "images", "train2017"), os.path.join(src, "annotations", "instances_train2017.json")
    data = json.load(open(path))
    good = json.dumps(data)
    ann = data["annotations"][5]
    ann["category_id"] = 99  # was "skipping corrupt sample ... KeyError: 99" at train time
    json.dump(data, open(path, "w"))
    with pytest.raises(ValueError, match=f"annotation {ann['id']} .* has category_id 99, which is not in its "
                                         "categories"):
        converters.coco(images, path)
    data = json.loads(good)
    ann = data["annotations"][5]
    width = next(i["width"] for i in data["images"] if i["id"] == ann["image_id"])
    ann["bbox"] = [width + 2.0, 1.0, 5.0, 5.0]  # right of the image: nothing left after clamping
    json.dump(data, open(path, "w"))
    with pytest.raises(ValueError, match=f"annotation {ann['id']} .* outside the image: clamped to it, its area "
                                         "is zero"):
        converters.coco(images, path)


def test_voc_boxes_outside_the_image_are_refused(synth, tmp_path):
    src = _copy_source(synth, "voc", tmp_path)
    voc = os.path.join(src, "VOCdevkit", "VOC2012")
    image_id = open(os.path.join(voc, "ImageSets", "Main", "train.txt")).read().split()[0]
    xml = os.path.join(voc, "Annotations", image_id + ".xml")
    tree = ET.parse(xml)
    height = int(tree.getroot().find("size").find("height").text)
    box = tree.getroot().find("object").find("bndbox")
    box.find("ymin").text, box.find("ymax").text = str(height + 5), str(height + 9)
    tree.write(xml)
    with pytest.raises(ValueError, match=f"VOC {image_id}: .* box .* lies outside the .* image"):
        converters.voc([voc], "train", classes=converters.read_class_file(os.path.join(voc, "classes.txt")))
