"""The device half of the pipeline: normalisation, padding and the photometric jitter drawn in the workers."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from mona_dist.data import resolve_shards
from mona_dist.data.config import CropConfig, PipelineConfig, ResizeConfig
from mona_dist.data.pipelines import TaskPipeline
from mona_dist.data.preprocess import DataPreprocessor, apply_jitter, resize_target
from mona_dist.data.transforms import JitterDraw, RandomCropNoPad, ResizeThenCrop, ShortSideResize
from mona_dist.data.wds_compat import SkipCounter, iter_shard

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def single_process_group(monkeypatch):
    """A one-rank gloo group in memory, as `train.setup.join_group` makes for DeepSpeed in one process (with the
    variables `distributed.init_distributed` exports)."""
    import torch.distributed as tdist

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    created = not tdist.is_initialized()  # a failed run earlier in this process may have left its group
    if created:
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        tdist.destroy_process_group()


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def reference(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (images.float() / 255 - mean) / std


def test_uint8_batches_are_normalised_and_floats_pass_through():
    pre = DataPreprocessor(MEAN, STD)
    images = pixels(2, 3, 8, 10)
    assert torch.allclose(pre(images), reference(images), atol=1e-6)
    already = torch.randn(2, 3, 8, 10)
    assert pre(already) is already
    listed = pre([images[0], images[1, :, :5]])  # detection: a list of differently sized images
    assert torch.allclose(listed[1], reference(images[1, :, :5]), atol=1e-6)
    with pytest.raises(TypeError, match="uint8 pixels or normalised floats"):
        pre(images.to(torch.int32))


def test_padding_is_zero_after_normalisation():
    images = pixels(2, 3, 8, 10)
    images[1, :, 6:], images[1, :, :, 7:] = 0, 0
    out = DataPreprocessor(MEAN, STD)(images, img_sizes=[(8, 10), (6, 7)])
    assert (out[1, :, 6:] == 0).all() and (out[1, :, :, 7:] == 0).all()
    assert torch.allclose(out[1, :, :6, :7], reference(images[1, :, :6, :7]), atol=1e-6)
    assert torch.allclose(out[0], reference(images[0]), atol=1e-6)


def test_under_deepspeed_bf16_the_backbone_gets_bf16_computed_in_fp32(single_process_group):
    """The real engine: DeepSpeed casts the parameters (not the buffers) and sets the preprocessor's output dtype;
    the backbone receives the fp32 normalisation rounded once to bf16, and the preprocessor has no state."""
    from mona_dist.config.schema import EngineConfig, OptimConfig
    from mona_dist.engine import build_engine
    from mona_dist.models import build_backbone
    from mona_dist.tasks.cls import Classifier, ClsHeadOptions

    torch.manual_seed(0)
    pre = DataPreprocessor(MEAN, STD)
    model = Classifier(build_backbone("swin_nano_patch4_window7", "mona"), 4, ClsHeadOptions(), pre)
    engine = build_engine(model, EngineConfig(name="deepspeed", zero_stage=2, precision="bf16"), OptimConfig(),
                          micro_batch_size=2)
    seen = {}
    model.backbone.register_forward_pre_hook(lambda _m, args: seen.update(images=args[0]))
    images = pixels(2, 3, 32, 32)
    loss = engine({"images": images, "labels": torch.tensor([0, 3])})["loss"]
    assert next(model.backbone.parameters()).dtype == torch.bfloat16 and pre.output_dtype == torch.bfloat16
    assert seen["images"].dtype == torch.bfloat16
    assert torch.equal(seen["images"], reference(images).to(torch.bfloat16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert pre.state_dict() == {} and list(pre.buffers()) == []  # nothing lands in checkpoints, nothing to cast


def test_device_jitter_is_torchvisions_color_jitter_with_the_workers_draws():
    image = pixels(3, 12, 16).float() / 255
    for seed in range(5):
        torch.manual_seed(seed)
        draw = JitterDraw(0.4, 0.5, 0.5, 0.1)()
        torch.manual_seed(seed)  # the same draws through torchvision's own transform
        want = v2.ColorJitter(0.4, 0.5, 0.5, 0.1)(image)
        assert torch.allclose(apply_jitter(image, draw), want, atol=1e-6)
        assert not torch.allclose(want, image, atol=1e-2)  # the jitter did something


def test_skipped_or_disabled_jitter_is_the_identity():
    assert JitterDraw(0.4, 0.4, 0.4, 0.1, p=0.0)().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0]
    draw = JitterDraw(0.0, 0.5, 0.0, 0.0)()
    assert draw[[0, 2, 3]].tolist() == [1.0, 1.0, 0.0] and draw[1] != 1.0
    image = pixels(3, 8, 8).float() / 255
    assert torch.equal(apply_jitter(image, JitterDraw(0.4, 0.4, 0.4, 0.1, p=0.0)()), image)


def test_jitter_statistics_see_only_the_valid_pixels():
    torch.manual_seed(0)
    draws = torch.stack([JitterDraw(0.4, 0.8, 0.5, 0.1)() for _ in range(2)])
    small = pixels(3, 5, 6, seed=1)
    batch = torch.zeros(2, 3, 8, 10, dtype=torch.uint8)
    batch[0], batch[1, :, :5, :6] = pixels(3, 8, 10), small
    pre = DataPreprocessor(MEAN, STD)
    out = pre(batch, img_sizes=[(8, 10), (5, 6)], jitter=draws)
    alone = pre(small[None], jitter=draws[1:])  # contrast blends with the mean: padding must not enter it
    assert torch.allclose(out[1, :, :5, :6], alone[0], atol=1e-6)
    assert (out[1, :, 5:] == 0).all()


def first_samples(out: str, n: int = 6) -> tuple[list[dict], object]:
    shards = resolve_shards(f"{out}/shards/train.index.json")
    return [s for url in shards.urls[:1] for s in iter_shard(url, skips=SkipCounter())][:n], shards


def test_detection_resize_on_the_device_matches_the_workers(synth):
    # Without a crop, detection workers only draw the size; the model resizes image, boxes and masks. Same draws
    # through the old worker-side resize must give the same model input.
    raws, shards = first_samples(synth("coco"))
    cfg = PipelineConfig(resize=ResizeConfig(short=(80, 120), max_size=200), flip=0.5)
    deferred = TaskPipeline("coco", cfg, True, shards.classes)
    assert [type(t).__name__ for t in deferred.transform.transforms] == ["DrawSize", "RandomHorizontalFlip"]
    worker = TaskPipeline("coco", cfg, True, shards.classes)
    worker.transform = v2.Compose([ShortSideResize((80, 120), 200), v2.RandomHorizontalFlip(0.5)])
    torch.manual_seed(0)
    travelled = deferred.collate([deferred.sample(r) for r in raws])
    torch.manual_seed(0)
    resized = worker.collate([worker.sample(r) for r in raws])
    assert all(tuple(im.shape[-2:]) == t["orig_size"] != t["size"] for im, t in zip(travelled["images"],
                                                                                 travelled["targets"]))
    assert all(tuple(im.shape[-2:]) == t["size"] for im, t in zip(resized["images"], resized["targets"]))
    pre = DataPreprocessor(MEAN, STD)
    (dev_images, dev_targets), (cpu_images, cpu_targets) = pre.detection(travelled), pre.detection(resized)
    level = 1 / 255 / min(STD)  # one uint8 step, normalised
    for a, b, ta, tb in zip(dev_images, cpu_images, dev_targets, cpu_targets):
        assert a.shape == b.shape and ta["masks"].shape[-2:] == a.shape[-2:]
        assert (a - b).abs().max() < 1.01 * level  # float bilinear vs cv2's rounded uint8: at most one step
        assert torch.allclose(ta["boxes"], tb["boxes"], atol=1e-4)
        assert torch.equal(ta["labels"], tb["labels"])
        assert ta["masks"].shape == tb["masks"].shape
        assert (ta["masks"] == tb["masks"]).float().mean().nan_to_num(1.0) > 0.995  # an image may have no objects
    assert sum(len(t["masks"]) for t in dev_targets) > 6


def test_resize_target_scales_boxes_and_masks():
    masks = torch.zeros(2, 4, 6, dtype=torch.uint8)
    masks[0, 1:3, 2:5] = 1
    target = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 6.0, 4.0]]), "masks": masks}
    out = resize_target(target, (4, 6), (8, 9))
    assert out["size"] == (8, 9)
    assert torch.allclose(out["boxes"], torch.tensor([[3.0, 2.0, 7.5, 6.0], [0.0, 0.0, 9.0, 8.0]]))
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (2, 6, 3, 7)  # nearest-exact of [3, 7.5)
    empty = resize_target({"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 4, 6, dtype=torch.uint8)}, (4, 6), (8, 9))
    assert empty["masks"].shape == (0, 8, 9)
    assert resize_target(target, (4, 6), (4, 6)) is target


def test_seg_crops_resized_and_flipped_on_the_device_match_the_workers(synth):
    # Seg workers pick the source window and draw the flip; the model resizes and flips. The same draws through
    # the worker-side ResizeThenCrop + flip must give the same images and label maps.
    raws, _ = first_samples(synth("ade20k"), 7)
    resize = dict(short=64, max_size=256, ratio_range=(0.5, 2.0))
    cfg = PipelineConfig(resize=ResizeConfig(**resize), crop=CropConfig(size=(48, 40), cat_max_ratio=0.75), flip=0.5)
    deferred = TaskPipeline("seg", cfg, True)
    assert [type(t).__name__ for t in deferred.transform.transforms] == ["CropWindow", "DrawFlip"]
    worker = TaskPipeline("seg", cfg, True)
    worker.transform = v2.Compose([
        ResizeThenCrop(ShortSideResize(64, 256, (0.5, 2.0)), RandomCropNoPad((48, 40), 0.75)),
        v2.RandomHorizontalFlip(0.5),
    ])
    torch.manual_seed(3)
    travelled = deferred.collate([deferred.sample(r) for r in raws])
    torch.manual_seed(3)
    cropped = worker.collate([worker.sample(r) for r in raws])
    assert travelled["sizes"] == cropped["img_sizes"] and travelled["img_sizes"] != travelled["sizes"]
    assert 0 < int(travelled["flips"].sum()) < len(raws)
    pre = DataPreprocessor(MEAN, STD)
    dev_images, dev_labels, dev_sizes = pre.segmentation(travelled)
    cpu_images, cpu_labels, cpu_sizes = pre.segmentation(cropped)
    assert dev_sizes == cpu_sizes and dev_images.shape == cpu_images.shape and dev_labels.dtype == torch.uint8
    level = 1 / 255 / min(STD)
    assert (dev_images - cpu_images).abs().max() < 1.01 * level  # float bilinear vs cv2's rounded uint8
    assert (dev_labels == cpu_labels).float().mean() > 0.995
    assert (dev_labels != 255).any()
