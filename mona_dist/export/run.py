"""A run's backbone rebuilt from its config and checkpoint: the trunk from `model.pretrained`, the trained tensors
from the checkpoint's `adapter.safetensors` (every trainable tensor of the task model, fp32 masters under
DeepSpeed), checked against the run's frozen-weight fingerprint so that another `model.pretrained` or seed fails
instead of exporting a backbone the run never had."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mona_dist.adapters import load_adapter
from mona_dist.models import Backbone


def backbone_from_checkpoint(cfg, checkpoint: str) -> tuple[Backbone, Path, int, nn.Module]:
    """(backbone with the run's weights, checkpoint directory, its step, the task model) for `checkpoint` =
    latest or a path."""
    from mona_dist.tasks import TASKS
    from mona_dist.infer.restore import find_checkpoint
    from mona_dist.train.checkpoint import check_meta, frozen_fingerprint
    from mona_dist.train.setup import build_task_model

    ckpt, _ = find_checkpoint(cfg.output_dir, checkpoint)  # as eval/predict and train --resume find it
    adapter = ckpt / "adapter.safetensors"
    if not adapter.is_file():
        raise FileNotFoundError(f"--checkpoint {ckpt}: no adapter.safetensors in it")
    model, _ = build_task_model(cfg, TASKS.get(cfg.task))  # as the trainer builds it
    # the run's task and frozen weights, checked as a resume checks them
    meta = check_meta(ckpt, {"task": cfg.task, "frozen_fingerprint": frozen_fingerprint(model)})
    load_adapter(model, adapter)
    return model.backbone.eval(), ckpt, int(meta["step"]), model.eval()
