"""Two-rank workers for the FSDP tests: a tiny Swin/ViT classifier under DDP and FSDP, side by side (spawned;
results come back through a torch file from rank 0)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as tdist

from mona_dist.adapters.io import clean_name
from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.distributed import finish
from mona_dist.engine import build_engine

from multirank import step_mean_loss
from toy import frozen_and_trainable, init_group, write_result

OPTIM = OptimConfig(lr=3e-3, weight_decay=0.01)


def classifier(method: str, backbone: str = "swin_nano_patch4_window7", **options):
    from mona_dist.models import build_backbone
    from mona_dist.tasks.cls import Classifier, ClsHeadOptions

    torch.manual_seed(0)  # the same frozen weights and initial adapters under every engine
    return Classifier(build_backbone(backbone, method, out_indices=(-1,), **options), 4, ClsHeadOptions())


def batch(rank: int, size: int = 32) -> dict:
    """This rank's fixed batch: the loss must fall within a few steps."""
    g = torch.Generator().manual_seed(rank)
    return {"images": torch.randn(2, 3, size, size, generator=g), "labels": torch.randint(0, 4, (2,), generator=g)}


def full_weights(model) -> tuple[dict, dict]:
    """(frozen, trainable) weights by state_dict name, each gathered whole from its shards under FSDP (collective):
    the fp32 weights the engine keeps, whatever it computes in."""
    from torch.distributed.tensor import DTensor

    frozen, trainable = {}, {}
    for name, p in model.named_parameters():
        t = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        (trainable if p.requires_grad else frozen)[clean_name(name)] = t
    return frozen, trainable


def steps(engine, rank: int, start: int, n: int, size: int = 32) -> list[float]:
    """`n` optimizer steps; the mean loss over ranks of each. Dropout draws from a seed fixed per step."""
    losses = []
    for step in range(start, start + n):
        torch.manual_seed(step)
        losses.append(step_mean_loss(engine, batch(rank, size)))
    return losses


def run_methods(rank: int, world_size: int, port: int, variants: list[dict], out: str) -> None:
    """For each variant {"method", "engine": {...}, "resume": bool}: train 4 steps; frozen / trainable weights;
    the exported adapter tensors; with "resume", save, train 2 more, and compare with a fresh engine loaded from
    the checkpoint (its trainable weights scrambled first) training the same 2."""
    init_group(rank, world_size, port)
    results = {}
    for i, spec in enumerate(variants):
        cfg = EngineConfig(**spec["engine"])
        model = classifier(spec["method"], **spec.get("options", {}))
        frozen0, trainable0 = frozen_and_trainable(model)
        engine = build_engine(model, cfg, OPTIM, micro_batch_size=2, world_size=world_size)
        r = {"losses": [], "scales": []}  # scales: the fp16 loss scale after each step (None without a scaler)
        for step in range(4):
            r["losses"] += steps(engine, rank, step, 1)
            r["scales"].append(float(engine.scaler.get_scale()) if getattr(engine, "scaler", None) else None)
        r["grad_norm"] = float(engine.grad_norm)
        frozen1, trainable1 = full_weights(model)
        r["frozen_same"] = sorted(frozen0) == sorted(frozen1) and all(torch.equal(frozen0[k], frozen1[k])
                                                                      for k in frozen0)
        r["trainable_changed"] = [k for k in trainable0 if not torch.equal(trainable0[k], trainable1[k])]
        with engine.exported() as plain:  # gathered in the compute dtype: the frozen weights rounded to it
            exported = {clean_name(n): p.detach().clone() for n, p in plain.named_parameters() if not p.requires_grad}
        r["exported_frozen_same"] = all(torch.equal(frozen0[k].to(v.dtype), v) for k, v in exported.items())
        r["n_trainable"] = len(trainable0)
        r["exported"] = engine.trainable_weights()  # collective
        r["optimizer_params"] = sum(len(g["params"]) for g in engine.optimizer.param_groups)
        # steps AdamW took (one the fp16 scaler skips is not counted)
        r["optimizer_steps"] = max((int(st["step"]) for st in engine.optimizer.state.values()), default=0)
        if spec.get("resume"):
            ckpt = Path(out).parent / f"ckpt-{i}"
            if rank == 0:
                ckpt.mkdir()
            tdist.barrier()
            engine.save(ckpt)
            r["after"] = steps(engine, rank, 4, 2)
            scrambled = classifier(spec["method"], **spec.get("options", {}))
            with torch.no_grad():
                for p in scrambled.parameters():
                    if p.requires_grad:
                        p.add_(1.0)
            fresh = build_engine(scrambled, cfg, OPTIM, micro_batch_size=2, world_size=world_size)
            fresh.load(ckpt)
            fresh.set_lr(engine.lr)
            r["resumed"] = steps(fresh, rank, 4, 2)
            r["checkpoint_files"] = sorted(p.name for p in (ckpt / "engine").iterdir())
        engine.release()
        results[spec["key"]] = r
    finish()  # the two ranks leave their group: rank 0 then reads the checkpoints alone
    if rank == 0:  # one rank alone reads what two wrote: DCP reshards
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
        for i, spec in enumerate(variants):
            if spec.get("resume"):
                fresh = build_engine(classifier(spec["method"], **spec.get("options", {})),
                                     EngineConfig(**spec["engine"]), OPTIM, micro_batch_size=2)
                fresh.load(Path(out).parent / f"ckpt-{i}")
                results[spec["key"]]["one_rank"] = fresh.trainable_weights()
                results[spec["key"]]["one_rank_step"] = steps(fresh, 0, 4, 1)
        tdist.destroy_process_group()
    write_result(Path(out), rank, results)


def run_compiled(rank: int, world_size: int, port: int, variants: list[dict], out: str) -> None:
    """vit_nano with Mona (dropout 0: inductor draws its own random numbers) under each variant, 2 steps; also
    what dynamo compiled and where it broke graphs."""
    from torch._dynamo.utils import counters

    init_group(rank, world_size, port)
    results = {}
    for spec in variants:
        counters.clear()
        cfg = EngineConfig(**spec["engine"])
        model = classifier("mona", "vit_nano_patch16", dropout=0.0)
        engine = build_engine(model, cfg, OPTIM, micro_batch_size=2, world_size=world_size)
        results[spec["key"]] = {"losses": steps(engine, rank, 0, 2), "captured": counters["stats"]["calls_captured"],
                                "graph_breaks": sum(counters["graph_break"].values())}
        engine.release()
    write_result(Path(out), rank, results)


class NormNet(torch.nn.Module):
    """A plain BatchNorm between two layers (as UperNet's heads on CPU): its running statistics are buffers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))

    def forward(self, batch: dict) -> dict:
        logits = self.net(batch["x"])
        return {"loss": torch.nn.functional.cross_entropy(logits, batch["y"]), "logits": logits}


def run_batchnorm(rank: int, world_size: int, port: int, variants: list[dict], out: str) -> None:
    """Train on per-rank data, then evaluate one shared input: do the ranks agree on the running statistics?"""
    init_group(rank, world_size, port)
    g = torch.Generator().manual_seed(rank)
    data = {"x": torch.randn(8, 8, generator=g) * (1 + rank), "y": torch.randint(0, 4, (8,), generator=g)}
    shared = {"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(99)),
              "y": torch.zeros(4, dtype=torch.long)}
    results = {}
    for spec in variants:
        engine = build_engine(NormNet(), EngineConfig(**spec["engine"]), OPTIM, micro_batch_size=8,
                              world_size=world_size)
        for _ in range(3):
            engine.backward(engine(data)["loss"])
            engine.step()
        engine.train(False)
        with torch.no_grad():
            logits = engine(shared)["logits"].contiguous()
        gathered = [torch.empty_like(logits) for _ in range(world_size)]
        tdist.all_gather(gathered, logits)
        results[spec["key"]] = {"ranks_agree": all(torch.equal(gathered[0], t) for t in gathered)}
    write_result(Path(out), rank, results)
