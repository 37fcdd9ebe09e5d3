"""Two-rank worker for the detector engine test (spawned; rank 0 writes the results to a torch file)."""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from dense_data import det_batches
from multirank import step_mean_loss

TINY = {
    "coco": dict(fpn_channels=32, conv_channels=32, fc_channels=64, mask_channels=32, anchor_scale=4,
                 rpn_proposals_train=100, rpn_proposals_test=50, rcnn_samples=32),
    "voc": dict(fpn_channels=32, feat_channels=32, octave_base_scale=2),
}


def build(task: str):
    from mona_dist.tasks.coco import build_cascade
    from mona_dist.tasks.voc import build_retinanet

    torch.manual_seed(0)
    return (build_cascade if task == "coco" else build_retinanet)("swin_nano_patch4_window7", "mona", 2, TINY[task])


def snapshot(model) -> tuple[dict, dict]:
    from mona_dist.adapters.io import clean_name

    frozen = {clean_name(n): p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {clean_name(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trainable


def run_detectors(rank: int, world_size: int, port: int, variants: dict[str, list[dict]], out: str) -> None:
    """Each detector under each engine variant: a few steps on this rank's own batches; what moved, what did not."""
    from mona_dist.config.schema import EngineConfig, OptimConfig
    from mona_dist.engine import build_engine

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results = {}
    for task, specs in variants.items():
        for spec in specs:
            cfg = EngineConfig(**spec)
            model = build(task)
            frozen0, trainable0 = snapshot(model)
            engine = build_engine(model, cfg, OptimConfig(lr=1e-3, weight_decay=0.0), micro_batch_size=2,
                                  world_size=world_size)
            losses = []
            for step in range(3):
                batch = det_batches(100 * step + rank, 2, 2, with_masks=task == "coco")[0]
                losses.append(step_mean_loss(engine, batch))
            frozen1, trainable1 = snapshot(model)
            moved = [k for k in trainable0 if not torch.equal(trainable0[k], trainable1[k].to(trainable0[k].dtype))]
            results[f"{task}-{cfg.name}{cfg.zero_stage}{'-ac' if cfg.activation_checkpointing else ''}"] = {
                "losses": losses,
                "frozen_same": sorted(frozen0) == sorted(frozen1) and
                all(torch.equal(frozen0[k], frozen1[k]) for k in frozen0),
                "n_frozen": len(frozen0),
                "mona_moved": all(k in moved for k in trainable0 if k.endswith("project1.weight")),
                "moved_fraction": len(moved) / len(trainable0),
            }
            engine.release()
    if rank == 0:
        torch.save(results, out)
