"""Classification task: head on pooled last-stage features, CE with label smoothing, distributed top-1/top-5."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from torch.nn import functional as F

from mona_dist.config import validate
from mona_dist.models import build_backbone
from mona_dist.tasks import TASKS
from mona_dist.tasks.cls import Classifier, ClsHeadOptions, ClsTask, topk_correct

from multirank import spawn
from ports import free_port


def test_topk_correct_counts():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [1, 9, 2, 3, 4, 5]])
    labels = torch.tensor([0, 0, 3])  # top-1 hit; rank-6 miss; rank-4 hit only within top-5
    assert topk_correct(logits, labels) == [1, 2]
    assert topk_correct(logits[:, :3], torch.tensor([2, 0, 0]), ks=(1, 5)) == [0, 3]  # k capped at 3 classes


def classifier(smoothing: float = 0.0) -> Classifier:
    torch.manual_seed(0)
    return Classifier(build_backbone("swin_nano_patch4_window7", "mona"), 5, ClsHeadOptions(label_smoothing=smoothing))


def test_forward_pools_the_last_stage_and_applies_label_smoothing():
    model = classifier(0.2)
    images, labels = torch.randn(3, 3, 48, 40), torch.tensor([0, 4, 2])
    model.eval()
    logits = model({"images": images, "labels": labels})["logits"]
    assert logits.shape == (3, 5)
    pooled = model.backbone(images)[-1].mean(dim=(2, 3))
    torch.testing.assert_close(logits, model.head(pooled))
    model.train()
    for m in model.modules():  # Mona's dropout off, so train and eval forwards are the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    loss = model({"images": images, "labels": labels})["loss"]
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert not torch.allclose(loss, F.cross_entropy(logits, labels))


def test_build_model_trains_adapters_and_head_only():
    cfg = validate({"task": "cls", "data": {"train_shards": "x"},
                    "model": {"backbone": "swin_nano_patch4_window7", "method": "mona", "num_classes": 7,
                              "head": {"dropout": 0.1}}})
    task = TASKS.get("cls")
    assert isinstance(task, ClsTask)
    model = task.build_model(cfg)
    assert model.head.out_features == 7 and model.dropout.p == 0.1
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "head.weight" in trainable and not any("patch_embed" in n for n in trainable)


def test_the_model_normalises_uint8_batches_with_the_configured_statistics():
    cfg = validate({"task": "cls", "data": {"train_shards": "x", "train_pipeline": {
                        "random_resized_crop": {"size": 32}, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                        "eval_pipeline": {"center_crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}},
                    "model": {"backbone": "swin_nano_patch4_window7", "method": "mona", "num_classes": 3}})
    task = TASKS.get("cls")
    task.check(cfg)
    model = task.build_model(cfg).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # a uint8 batch and its by-hand normalisation give the same logits
        assert torch.allclose(model({"images": pixels})["logits"],
                              model({"images": (pixels.float() / 255 - 0.5) / 0.25})["logits"], atol=1e-5)


def test_train_and_eval_pipelines_must_share_mean_and_std():
    from mona_dist.config.loader import ConfigError

    cfg = validate({"task": "cls", "data": {"train_shards": "x", "eval_pipeline": {"center_crop": 32,
                                                                                  "mean": [0.5, 0.5, 0.5]}},
                    "model": {"backbone": "swin_nano_patch4_window7", "method": "mona", "num_classes": 3}})
    with pytest.raises(ConfigError, match=r"data\.eval_pipeline\.mean: .* differs from the train pipeline"):
        TASKS.get("cls").check(cfg)


def _batches(rank: int, world: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    images, labels = torch.randn(10, 3, 32, 32, generator=g), torch.randint(0, 5, (10,), generator=g)
    mine = list(range(rank, 10, world))  # an uneven split: 5 and 5 for 2 ranks, 10 for 1
    return [{"images": images[mine[i:i + 3]], "labels": labels[mine[i:i + 3]]} for i in range(0, len(mine), 3)]


def _eval_worker(rank: int, world: int, port: int, out: str) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = classifier().eval()
    metrics = ClsTask().evaluate(model, _batches(rank, world), dist=None)
    if rank == 0:
        torch.save(metrics, out)


@pytest.mark.slow
def test_distributed_eval_equals_single_process(tmp_path):
    model = classifier().eval()
    single = ClsTask().evaluate(model, _batches(0, 1), dist=None)
    with torch.no_grad():
        logits = torch.cat([model.logits(b["images"]) for b in _batches(0, 1)])
    labels = torch.cat([b["labels"] for b in _batches(0, 1)])
    top1, top5 = topk_correct(logits, labels)
    assert single == {"eval/top1": top1 / 10, "eval/top5": top5 / 10, "eval/samples": 10.0}
    out = tmp_path / "m.pt"
    spawn(_eval_worker, (2, free_port(), str(out)))
    assert torch.load(out, weights_only=True) == pytest.approx(single)
