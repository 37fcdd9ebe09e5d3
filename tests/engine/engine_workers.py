"""Two-rank workers for the engine tests (spawned; results come back through a torch file from rank 0)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as tdist

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine import build_engine

from multirank import step_mean_loss
from toy import frozen_and_trainable, init_group, toy_batch, toy_model, write_result

OPTIM = OptimConfig(lr=3e-2, weight_decay=0.01)


def train_steps(engine, rank: int, start: int, steps: int, grad_accum: int = 1) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        total = 0.0
        for micro in range(grad_accum):
            batch = toy_batch(step * grad_accum + micro, rank, batch=16 // grad_accum)
            with engine.accumulating(last=micro == grad_accum - 1):
                loss = engine(batch)["loss"]
                engine.backward(loss)
            total += loss.item() / grad_accum
        engine.step()
        t = torch.tensor([total])
        tdist.all_reduce(t)
        losses.append(t.item() / tdist.get_world_size())
    return losses


def run_variants(rank: int, world_size: int, port: int, variants: list[dict], out: str) -> None:
    """For each engine variant: train, check frozen/trainable, save, continue, reload into a fresh engine."""
    init_group(rank, world_size, port)
    results = {}
    for spec in variants:
        cfg = EngineConfig(**spec)
        model = toy_model()
        frozen0, trainable0 = frozen_and_trainable(model)
        engine = build_engine(model, cfg, OPTIM, micro_batch_size=16 // cfg.grad_accum, world_size=world_size)
        losses = train_steps(engine, rank, 0, 12, cfg.grad_accum)
        norm = engine.grad_norm
        ckpt = Path(out).parent / f"ckpt-{len(results)}"  # shared by both ranks
        if rank == 0:
            ckpt.mkdir()
        tdist.barrier()
        engine.save(ckpt)
        tdist.barrier()
        with engine.exported() as plain:
            frozen1, trainable1 = frozen_and_trainable(plain)
        after = train_steps(engine, rank, 12, 4, cfg.grad_accum)
        # Frozen weights come from the (seeded) build as in a real resume; trainable ones are scrambled first.
        scrambled = toy_model()
        with torch.no_grad():
            for p in scrambled.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        fresh = build_engine(scrambled, cfg, OPTIM, micro_batch_size=16 // cfg.grad_accum,
                             world_size=world_size)
        fresh.load(ckpt)
        fresh.set_lr(engine.lr)
        resumed = train_steps(fresh, rank, 12, 4, cfg.grad_accum)
        results[cfg.name + str(cfg.zero_stage) + cfg.precision + f"a{cfg.grad_accum}"] = {
            "losses": losses,
            "grad_norm": norm,
            # bf16 DeepSpeed holds every weight in bf16: frozen ones must equal their rounded start values.
            "frozen_same": all(torch.equal(frozen0[k].to(frozen1[k].dtype), frozen1[k]) for k in frozen0),
            "trainable_changed": all(not torch.equal(trainable0[k], trainable1[k].to(trainable0[k].dtype))
                                     for k in trainable0),
            "after": after,
            "resumed": resumed,
            # what DDP was built with: the toy has no BatchNorm, so no buffer broadcast; gradients in its buckets
            "ddp_flags": [getattr(engine.module, "broadcast_buffers", None),
                          getattr(engine.module, "gradient_as_bucket_view", None)],
        }
    write_result(Path(out), rank, results)


def run_swin_mona(rank: int, world_size: int, port: int, variants: list[dict], out: str) -> None:
    """The real model: a tiny Swin with Mona + linear head fits a fixed batch under each engine."""
    from mona_dist.adapters.io import clean_name
    from mona_dist.models import build_backbone
    from mona_dist.tasks.cls import Classifier, ClsHeadOptions

    init_group(rank, world_size, port)
    g = torch.Generator().manual_seed(rank)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 4, (4,), generator=g)}
    results = {}
    for spec in variants:
        cfg = EngineConfig(**spec)
        torch.manual_seed(0)
        model = Classifier(build_backbone("swin_nano_patch4_window7", "mona"), 4, ClsHeadOptions())
        frozen0, trainable0 = frozen_and_trainable(model)
        engine = build_engine(model, cfg, OptimConfig(lr=3e-3, weight_decay=0.0), micro_batch_size=4,
                              world_size=world_size)
        losses = []
        for _ in range(10):
            losses.append(step_mean_loss(engine, batch))
        if cfg.zero_stage == 3:  # frozen weights are partitioned too: gather everything to compare
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                frozen1, trainable1 = frozen_and_trainable(model)
        else:
            frozen1, trainable1 = frozen_and_trainable(model)
        frozen1, trainable1 = ({clean_name(k): v for k, v in d.items()} for d in (frozen1, trainable1))
        results[f"{cfg.name}{cfg.zero_stage}"] = {
            "losses": losses,
            "frozen_same": all(torch.equal(frozen0[k], frozen1[k]) for k in frozen0),
            "mona_changed": all(not torch.equal(trainable0[k], trainable1[k]) for k in trainable0
                                if k.endswith(("project1.weight", "project2.weight"))),
            "n_trainable": len(trainable0),
        }
    write_result(Path(out), rank, results)


def full_grads(engine, model) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient after `engine.backward`, whole and averaged over the ranks, by
    state_dict name (collective under DeepSpeed and FSDP: call on every rank in the same order)."""
    from torch.distributed.tensor import DTensor

    from mona_dist.adapters.io import clean_name

    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if engine.cfg.name == "deepspeed":
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[clean_name(name)] = g.detach().float().cpu().clone()
    return out


MONA_OPTIONS = {"plain": {"recompute": False, "fused": False}, "recomputed": {"fused": False}, "default": {}}


def run_mona_grads(rank: int, world_size: int, port: int, variants: list[dict], out: str) -> None:
    """Per engine variant: one step's gradients of a tiny Swin with Mona (odd grids, dropout on, masks drawn from
    the same seed), computed with the plain official ops, recomputed only, and recomputed and fused (the default)."""
    from mona_dist.models import build_backbone
    from mona_dist.tasks.cls import Classifier, ClsHeadOptions

    init_group(rank, world_size, port)
    g = torch.Generator().manual_seed(rank)
    # 36 x 44: grids 9x11, 5x6, 3x3, 2x2 (the official arithmetic pads odd sizes)
    batch = {"images": torch.randn(2, 3, 36, 44, generator=g), "labels": torch.randint(0, 4, (2,), generator=g)}
    results = {}
    for spec in variants:
        cfg = EngineConfig(**spec)
        grads = {}
        for label, options in MONA_OPTIONS.items():
            torch.manual_seed(0)
            model = Classifier(build_backbone("swin_nano_patch4_window7", "mona", **options), 4, ClsHeadOptions())
            engine = build_engine(model, cfg, OptimConfig(lr=1e-3, weight_decay=0.0), micro_batch_size=2,
                                  world_size=world_size)
            engine.train()
            torch.manual_seed(100 + rank)  # this rank's dropout masks, the same for every label
            engine.backward(engine(batch)["loss"])
            grads[label] = full_grads(engine, model)
            engine.release()
        key = f"{cfg.name}{cfg.zero_stage}" + ("-ac" if cfg.activation_checkpointing else "")
        results[key] = grads
    write_result(Path(out), rank, results)
