"""`mona-dist predict`: per-task outputs in the right formats, computed through the eval pipeline (the predictions
of the val images score what the run's own eval scored), and bad inputs as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
from PIL import Image

from mona_dist.cli import main
from infer_helpers import assert_restores_the_saved_state, final_eval


def predict(config: Path, images: str, out: Path, *extra: str) -> None:
    assert main(["predict", "--config", str(config), "--images", images, "--out", str(out), *extra]) == 0


def source(config: Path) -> Path:
    """The synthetic set's source/ beside the shards the run trained on."""
    cfg = yaml.safe_load(config.read_text())
    return Path(cfg["data"]["train_shards"]).parent.parent / "source"


def test_cls_top5_json_and_bars_and_the_runs_accuracy(tmp_path, trained):
    config = trained("cls")
    src = source(config) / "val"
    predict(config, str(src / "*" / "*.jpg"), tmp_path)
    index = json.loads((tmp_path / "images.json").read_text())
    assert len(index) == 24
    hits = 0
    for entry in index:
        rows = json.loads((tmp_path / f"{entry['name']}.json").read_text())
        assert [r["name"] for r in rows] and len(rows) == 4  # 4 classes: top-5 is all of them
        assert {r["name"] for r in rows} == {"circle", "square", "triangle", "diamond"}
        probs = [r["prob"] for r in rows]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        hits += rows[0]["name"] == Path(entry["file"]).parent.name
        assert Image.open(tmp_path / f"{entry['name']}.vis.png").size[1] >= 224
    # the same resize, crop and normalisation as the eval pipeline: the same top-1 as the run's final eval
    assert hits / len(index) == final_eval(config.parent / "run")["eval/top1"]
    assert_restores_the_saved_state(config)  # from the trained weights (the run's eval is of those)


def test_seg_label_maps_at_the_source_size_score_the_runs_miou(tmp_path, trained):
    from mona_dist.data.pipelines import reduce_zero_label
    from mona_dist.tasks.seg import areas_to_metrics, batch_areas

    config = trained("ade20k")
    src = source(config)
    predict(config, str(src / "images" / "validation"), tmp_path)
    areas = torch.zeros(4, 6, dtype=torch.float64)
    files = sorted((src / "images" / "validation").glob("*.jpg"))
    assert len(files) == 6
    for f in files:
        label_map = Image.open(tmp_path / f"{f.stem}.png")
        assert label_map.size == Image.open(f).size and label_map.mode == "P"
        pred = torch.from_numpy(np.asarray(label_map).astype(np.int64))
        assert 1 <= int(pred.min()) and int(pred.max()) <= 6  # ADE20K's labels: the model's class k is k+1
        truth = reduce_zero_label(torch.from_numpy(np.array(Image.open(src / "annotations" / "validation" /
                                                                        f"{f.stem}.png"))))
        areas += batch_areas(pred - 1, truth.long(), 6)
        assert (tmp_path / f"{f.stem}.vis.png").is_file()
    # Images of one batch are padded to a common size, and the padding reaches the logits near the border (as
    # in mmseg): one image per forward is what eval computes with one image per batch.
    assert main(["eval", "--config", str(config), "--set", "data.eval_batch_size=1", "--out", str(tmp_path / "ev")]) == 0
    want = {k: v for k, v in json.loads((tmp_path / "ev" / "metrics.json").read_text()).items() if k.startswith("eval/")}
    assert areas_to_metrics(areas) == pytest.approx(want, abs=1e-9)
    assert_restores_the_saved_state(config)  # predict and eval restore alike: that must be the run's state


def test_coco_results_load_with_pycocotools(tmp_path, trained):
    from pycocotools.coco import COCO

    config = trained("coco")
    images = source(config) / "images" / "val2017"
    # an untrained detector scores below the recipe's 0.05: keep every detection so there is something to load
    predict(config, str(images), tmp_path, "--set", "model.head.score_thresh=0.0", "--set",
            "model.head.detections_per_img=5")
    index = json.loads((tmp_path / "images.json").read_text())
    results = json.loads((tmp_path / "coco_results.json").read_text())
    assert results and len(results) <= 5 * len(index)
    gt = COCO()
    gt.dataset = {"images": [{"id": e["image_id"], "height": e["height"], "width": e["width"]} for e in index],
                  "annotations": [], "categories": [{"id": i, "name": n} for i, n in
                                                    [(2, "circle"), (5, "square"), (7, "triangle"), (11, "diamond")]]}
    gt.createIndex()
    dt = gt.loadRes(results)
    assert len(dt.getAnnIds()) == len(results)
    for e in index:
        per_image = json.loads((tmp_path / f"{e['name']}.json").read_text())
        assert all(r["image_id"] == e["image_id"] and r["segmentation"]["size"] == [e["height"], e["width"]]
                   for r in per_image)
    assert {r["category_id"] for r in results} <= {2, 5, 7, 11}


def test_voc_boxes_json_in_source_pixels(tmp_path, trained):
    config = trained("voc")
    images = sorted((source(config)).rglob("JPEGImages/*.jpg"))[:3]
    predict(config, str(images[0].parent / "*.jpg"), tmp_path, "--set", "model.head.score_thresh=0.0")
    for e in json.loads((tmp_path / "images.json").read_text()):
        boxes = json.loads((tmp_path / f"{e['name']}.json").read_text())
        assert boxes, "score_thresh 0 keeps detections"
        for b in boxes:
            x1, y1, x2, y2 = b["box"]
            assert 0 <= x1 <= x2 <= e["width"] and 0 <= y1 <= y2 <= e["height"]
            assert b["name"] in {"circle", "square", "triangle", "diamond"} and 0 <= b["score"] <= 1
        assert Image.open(tmp_path / f"{e['name']}.vis.png").size[0] >= e["width"]


def test_bad_images_are_one_line(tmp_path, trained, capsys):
    config = trained("cls")
    assert main(["predict", "--config", str(config), "--images", str(tmp_path / "*.jpg"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mona-dist predict: error: --images {tmp_path}/*.jpg: the pattern matches no file"
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert main(["predict", "--config", str(config), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mona-dist predict: error: {tmp_path / 'broken.jpg'}: not a readable image") and "\n" not in err
    assert not (tmp_path / "o").exists()
