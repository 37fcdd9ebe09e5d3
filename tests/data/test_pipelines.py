"""Per-task pipelines: batch formats, label conventions, and boxes/masks staying on the image through augmentation."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from mona_dist.data import DataConfig, build_loader, resolve_shards
from mona_dist.data.config import CropConfig, PipelineConfig, ResizeConfig
from mona_dist.data.pipelines import TaskPipeline, reduce_zero_label
from mona_dist.data.preprocess import DataPreprocessor
from mona_dist.data.transforms import RandomCropNoPad, ResizeThenCrop, ShortSideResize, build_transform
from mona_dist.data.wds_compat import SkipCounter, iter_shard

AUGMENT = PipelineConfig(resize=ResizeConfig(short=(48, 96), max_size=120), crop=CropConfig(size=(56, 56)), flip=1.0)


def raw_samples(out: str, split: str) -> list[dict]:
    shards = resolve_shards(os.path.join(out, "shards", f"{split}.index.json"))
    return [s for url in shards.urls for s in iter_shard(url, skips=SkipCounter())]


def loader(synth, task, src, split, pipeline, **kw):
    out = synth(src)
    cfg = DataConfig(train_shards=f"{out}/shards/train.index.json", val_shards=f"{out}/shards/val.index.json",
                     batch_size=4, eval_batch_size=3, workers=0, shuffle_buffer=0, drop_last=False,
                     **{("train_pipeline" if split == "train" else "eval_pipeline"): pipeline}, **kw)
    return build_loader(task, cfg, split, rank=0, world_size=1, seed=0)


def mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_coco_masks_and_boxes_move_together(synth):
    targets = [t for b in loader(synth, "coco", "coco", "train", AUGMENT) for t in b["targets"]]
    assert len(targets) == 24
    whole = 0
    for t in targets:
        assert t["masks"].dtype == torch.uint8 and t["boxes"].dtype == torch.float32
        assert t["masks"].shape[0] == t["boxes"].shape[0] == t["labels"].shape[0]
        h, w = t["masks"].shape[-2:]
        for box, mask in zip(t["boxes"], t["masks"]):
            got, box = mask_box(mask), box.tolist()
            # flip (p=1), random resize and crop: the mask stays inside its box (rasterisation +-2 px) ...
            assert got[0] >= box[0] - 2 and got[1] >= box[1] - 2 and got[2] <= box[2] + 2 and got[3] <= box[3] + 2
            # ... and where the crop did not cut the object, its extent is the box
            if box[0] > 0 and box[1] > 0 and box[2] < w and box[3] < h:
                assert np.allclose(got, box, atol=2.0), (got, box)
                whole += 1
    assert whole > 10


def test_coco_labels_are_contiguous_and_crowds_leave_training(synth):
    train = [t for b in loader(synth, "coco", "coco", "train", AUGMENT) for t in b["targets"]]
    assert set(torch.cat([t["labels"] for t in train]).tolist()) <= {1, 2, 3, 4}
    assert not any(t["iscrowd"].any() for t in train)
    evals = [t for b in loader(synth, "coco", "coco", "val", PipelineConfig(resize=ResizeConfig(short=80)))
             for t in b["targets"]]
    raw = {json.loads(s["json"])["image"]["id"]: json.loads(s["json"]) for s in raw_samples(synth("coco"), "val")}
    crowd_images = 0
    for t in evals:
        meta = raw[t["image_id"]]
        cat_to_label = {2: 1, 5: 2, 7: 3, 11: 4}  # synthetic category ids 2, 5, 7, 11 -> 1..4
        assert t["labels"].tolist() == [cat_to_label[a["category_id"]] for a in meta["annotations"]]
        assert t["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in meta["annotations"]]
        assert t["orig_size"] == (meta["image"]["height"], meta["image"]["width"])
        # no crop: the worker only draws the size (short side 80); masks travel at the stored size
        assert min(t["size"]) == 80 and tuple(t["masks"].shape[-2:]) == t["orig_size"]
        crowd_images += bool(t["iscrowd"].any())
    assert crowd_images >= 1


def test_voc_boxes_zero_based_and_difficult_only_in_eval(synth):
    raw = {json.loads(s["json"])["image_id"]: json.loads(s["json"]) for s in raw_samples(synth("voc"), "val")}
    evals = [t for b in loader(synth, "voc", "voc", "val", PipelineConfig()) for t in b["targets"]]
    assert len(evals) == 9
    for t in evals:
        objs = raw[t["image_id"]]["objects"]
        want = [[o["bbox"][0] - 1, o["bbox"][1] - 1, o["bbox"][2], o["bbox"][3]] for o in objs]
        assert torch.allclose(t["boxes"], torch.tensor(want).reshape(-1, 4))
        assert t["difficult"].tolist() == [o["difficult"] for o in objs]
        names = ["circle", "square", "triangle", "diamond"]
        assert t["labels"].tolist() == [names.index(o["name"]) + 1 for o in objs]
    train = [t for b in loader(synth, "voc", "voc", "train", AUGMENT) for t in b["targets"]]
    assert not any(t["difficult"].any() for t in train)


def test_seg_label_map_follows_image_through_augmentation():
    # The image carries its own label map (every channel = label * 30): after the worker's window crop and the
    # device's resize and flip they must agree.
    label = torch.zeros(60, 80, dtype=torch.uint8)
    label[10:40, 5:30], label[30:55, 50:75], label[:, 78:] = 1, 3, 5
    sample = {"image": tv_tensors.Image((label * 30).expand(3, -1, -1).clone()), "mask": tv_tensors.Mask(label)}
    cfg = PipelineConfig(resize=ResizeConfig(short=(40, 90), max_size=200, ratio_range=(0.5, 1.5)),
                         crop=CropConfig(size=(48, 48), cat_max_ratio=0.9), flip=0.5)
    pipe = TaskPipeline("seg", cfg, train=True)
    identity = DataPreprocessor(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)  # "normalised" = the pixel values
    flips = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out = pipe.transform(sample)
        images, masks, sizes = identity.segmentation(pipe.collate([out]))
        (h, w), image, mask = sizes[0], images[0, 0], masks[0]
        assert (h, w) == out["size"] and image.shape == mask.shape
        agree = (torch.round(image[:h, :w] / 30) == mask[:h, :w]).float().mean().item()
        assert agree > 0.9, agree  # only bilinear edges of the image may differ
        flips += out["flip"]
    assert 0 < flips < 10


def test_cat_max_ratio_rejects_single_class_crops():
    label = torch.zeros(100, 100, dtype=torch.uint8)
    label[:, 60:] = 1
    sample = {"image": tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8)), "mask": tv_tensors.Mask(label)}

    def balanced_crops(ratio):
        crop, hits = RandomCropNoPad((20, 20), cat_max_ratio=ratio), 0
        for seed in range(40):
            torch.manual_seed(seed)
            counts = torch.bincount(crop(sample)["mask"].flatten().long(), minlength=2)
            hits += counts.max().item() / counts.sum().item() < 0.75
        return hits

    # one draw is balanced with p = 9/81; mmseg's rule re-draws up to 10 times
    assert balanced_crops(None) <= 12 and balanced_crops(0.75) >= 18


def test_short_side_resize_respects_the_long_side_cap():
    image = tv_tensors.Image(torch.zeros(3, 100, 300, dtype=torch.uint8))
    assert ShortSideResize(80, max_size=1333)(image).shape[-2:] == (80, 240)
    assert ShortSideResize(80, max_size=150)(image).shape[-2:] == (50, 150)


def test_seg_batches_reduce_zero_label_and_keep_original_maps(synth):
    out = synth("ade20k")
    batches = list(loader(synth, "seg", "ade20k", "val", PipelineConfig(resize=ResizeConfig(short=40, max_size=80))))
    raw = raw_samples(out, "val")
    originals = [b for batch in batches for b in batch["orig_masks"]]
    assert len(originals) == len(raw) == 9
    for s, orig in zip(raw, originals):
        source = torch.from_numpy(np.asarray(Image.open(io.BytesIO(s["png"]))).copy())
        assert torch.equal(orig, reduce_zero_label(source).long())
    batch = batches[0]
    assert batch["images"].dtype == torch.uint8 and batch["masks"].dtype == torch.uint8
    assert batch["images"].shape[0] == batch["masks"].shape[0] == 3
    assert set(batch["masks"].unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}
    padded = [i for i, (h, w) in enumerate(batch["img_sizes"]) if (h, w) != tuple(batch["images"].shape[-2:])]
    assert padded  # the val images differ in size, so the batch pads some
    for i in padded:
        h, w = batch["img_sizes"][i]
        assert (batch["masks"][i, h:] == 255).all() and (batch["masks"][i, :, w:] == 255).all()  # padding: ignore
        assert (batch["images"][i, :, h:] == 0).all() and (batch["images"][i, :, :, w:] == 0).all()


def test_reduce_zero_label_matches_mmseg():
    raw = torch.tensor([0, 1, 2, 150, 255], dtype=torch.uint8)
    assert reduce_zero_label(raw).tolist() == [255, 0, 1, 149, 255]


def test_cls_batches_are_uint8_pixels_and_labelled(synth):
    cfg = PipelineConfig(resize=ResizeConfig(short=40), center_crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batches = list(loader(synth, "cls", "cls", "val", cfg))
    batch = batches[0]
    assert batch["images"].shape == (3, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["images"].float().std() > 10  # real pixels, not a constant
    assert batch["labels"].dtype == torch.int64
    # val image i has class i % 4; the writer orders by class folder, eval keeps shard order
    assert torch.cat([b["labels"] for b in batches]).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]


def test_eval_pipelines_must_be_deterministic():
    with pytest.raises(ValueError, match="eval_pipeline must be deterministic"):
        TaskPipeline("coco", AUGMENT, train=False, classes=[{"id": 1, "name": "a"}])
    with pytest.raises(ValueError, match="class list"):
        TaskPipeline("voc", PipelineConfig(), train=True, classes=None)


def test_resize_then_crop_is_fused_and_matches_the_two_steps():
    # A smooth image with the label map in its red channel: fused and two-step outputs must agree closely.
    label = torch.zeros(60, 80, dtype=torch.uint8)
    label[10:40, 5:30], label[30:55, 50:75] = 1, 3
    y, x = torch.meshgrid(torch.arange(60), torch.arange(80), indexing="ij")
    image = torch.stack([label * 60, (x * 3).to(torch.uint8), (y * 4).to(torch.uint8)])
    sample = {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(label)}
    cfg = PipelineConfig(resize=ResizeConfig(short=(40, 90), max_size=200, ratio_range=(0.5, 1.5)),
                         crop=CropConfig(size=(48, 48)))
    assert [type(t).__name__ for t in build_transform("seg", cfg, train=True).transforms] == ["CropWindow"]
    assert [type(t).__name__ for t in build_transform("voc", cfg, train=True).transforms] == [
        "ResizeThenCrop", "SanitizeBoundingBoxes"]  # detection with a crop: resized in the worker
    fused = ResizeThenCrop(ShortSideResize((40, 90), 200, (0.5, 1.5)), RandomCropNoPad((48, 48)))
    two_steps = v2.Compose([ShortSideResize((40, 90), 200, (0.5, 1.5)), RandomCropNoPad((48, 48))])
    for seed in range(10):
        torch.manual_seed(seed)
        a = fused(sample)
        torch.manual_seed(seed)  # the same random draws
        b = two_steps(sample)
        assert a["mask"].shape == b["mask"].shape == a["image"].shape[-2:]
        assert (a["mask"] == b["mask"]).float().mean() > 0.9  # the window may sit one source pixel off
        assert (a["image"][1:].float() - b["image"][1:].float()).abs().mean() < 6
        assert (torch.round(a["image"][0].float() / 60) == a["mask"]).float().mean() > 0.9  # still aligned


def test_16_bit_pngs_are_the_8_bit_images_pil_gives_in_training_eval_and_predict(tmp_path):
    """decode_image gives uint16 for a 16-bit PNG; a uint8 batch took it modulo 256 (a ramp 0..65535 became 0, 97,
    194, 36, ...). PIL reads the same file as the high byte of each sample, which is torchvision's
    to_dtype(scale=True) too: training and eval batches and predict's decode (decode_rgb_bytes) must give that."""
    import cv2
    from torchvision.transforms.v2.functional import to_dtype

    from mona_dist.data import converters
    from mona_dist.data.pipelines import decode_rgb_bytes
    from mona_dist.data.writer import write_shards

    ramp = (np.arange(40 * 48 * 3) * 997 % 65536).astype(np.uint16).reshape(40, 48, 3)
    folder = tmp_path / "source" / "ramp"
    folder.mkdir(parents=True)
    assert cv2.imwrite(str(folder / "a.png"), ramp[..., ::-1])  # OpenCV writes BGR: a 16-bit RGB PNG
    with Image.open(folder / "a.png") as im:
        pil = np.asarray(im.convert("RGB"))
    assert (pil == ramp >> 8).all()  # PIL: the high byte
    data = (folder / "a.png").read_bytes()
    expected = torch.from_numpy(pil).permute(2, 0, 1)
    wide = torch.from_numpy(ramp.astype(np.int32)).permute(2, 0, 1)  # to_dtype's reference on the raw samples
    assert torch.equal(to_dtype(wide.to(torch.uint16), torch.uint8, scale=True), expected)
    assert torch.equal(decode_rgb_bytes(data), expected)
    from mona_dist.infer.predict import read_image

    assert torch.equal(read_image(folder / "a.png"), expected)  # predict: a TypeError traceback before

    refs, classes = converters.imagefolder(str(tmp_path / "source"))
    write_shards(refs, str(tmp_path / "shards" / "train"), task="cls", classes=classes, per_shard=4, progress=False)
    index = str(tmp_path / "shards" / "train.index.json")
    # no resampling: a crop of the whole image (train) and a centre crop (eval) show the decoded pixels themselves
    cfg = DataConfig(train_shards=index, val_shards=index, batch_size=1, eval_batch_size=1, workers=0,
                     train_pipeline=PipelineConfig(crop=CropConfig(size=(40, 48))),
                     eval_pipeline=PipelineConfig(center_crop=40))
    for split, want in (("train", expected), ("val", expected[:, :, 4:44])):
        batch = next(iter(build_loader("cls", cfg, split, rank=0, world_size=1, seed=0)))
        assert batch["images"].dtype == torch.uint8 and torch.equal(batch["images"][0], want), split
