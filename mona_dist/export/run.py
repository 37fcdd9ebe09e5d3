"""A run's backbone rebuilt from its config and checkpoint: the trunk from `model.pretrained`, the trained tensors
from the checkpoint's `adapter.safetensors` (every trainable tensor of the task model, fp32 masters under
DeepSpeed), checked against the run's frozen-weight fingerprint so that another `model.pretrained` or seed fails
instead of exporting a backbone the run never had."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from mona_dist.adapters import load_adapter
from mona_dist.models import Backbone
from mona_dist.models.pretrained import loading_policy


def backbone_from_checkpoint(cfg, checkpoint: str) -> tuple[Backbone, Path, int, nn.Module]:
    """(backbone with the run's weights, checkpoint directory, its step, the task model) for `checkpoint` =
    latest or a path."""
    from mona_dist.tasks import TASKS
    from mona_dist.infer.restore import find_checkpoint
    from mona_dist.train.checkpoint import frozen_fingerprint, read_meta
    from mona_dist.train.loop import seed_everything

    ckpt, _ = find_checkpoint(cfg.output_dir, checkpoint)  # as eval/predict and train --resume find it
    meta = read_meta(ckpt)
    adapter = ckpt / "adapter.safetensors"
    if not adapter.is_file():
        raise FileNotFoundError(f"--checkpoint {ckpt}: no adapter.safetensors in it")
    if meta.get("task") not in (None, cfg.task):
        raise ValueError(f"--checkpoint {ckpt} was written by a {meta['task']!r} run; the config's task is "
                         f"{cfg.task!r}")
    task = TASKS.get(cfg.task)
    seed_everything(cfg.train.seed)  # as the trainer builds it: the same init for anything not loaded
    with loading_policy(strict=cfg.model.pretrained_strict):
        model = task.build_model(cfg)
    want = meta.get("frozen_fingerprint")
    if want is not None and not np.isclose(frozen_fingerprint(model), want, rtol=1e-9, atol=1e-6):
        raise ValueError(f"--checkpoint {ckpt}: the frozen weights built from this config differ from the run's "
                         f"(model.pretrained {cfg.model.pretrained!r} or train.seed changed?)")
    load_adapter(model, adapter)
    return model.backbone.eval(), ckpt, int(meta["step"]), model.eval()
