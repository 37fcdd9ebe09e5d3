"""A tiny learnable model and data shared by the engine tests: frozen stem/norm, trainable adapter + head."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn


class Toy(nn.Module):
    """Stands in for backbone+adapter+head: the frozen parts must stay bit-identical, the rest must learn."""

    def __init__(self, dim: int = 16, classes: int = 4):
        super().__init__()
        self.stem = nn.Linear(8, dim)
        self.adapter = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        for p in (*self.stem.parameters(), *self.norm.parameters()):
            p.requires_grad_(False)

    def forward(self, batch: dict) -> dict:
        # the model takes its input in its weights' dtype, as a task model's DataPreprocessor hands it on
        x = self.stem(batch["x"].to(self.stem.weight.dtype))
        x = x + self.adapter(x)
        logits = self.head(self.norm(x))
        return {"loss": nn.functional.cross_entropy(logits.float(), batch["y"]), "logits": logits}


def toy_model(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def toy_batch(step: int, rank: int, batch: int = 16) -> dict:
    """Deterministic per (step, rank); labels come from a fixed random teacher, so the task is learnable."""
    teacher = torch.Generator().manual_seed(1234)
    w = torch.randn(8, 4, generator=teacher)
    g = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(batch, 8, generator=g)
    return {"x": x, "y": (x @ w).argmax(dim=1)}


def init_group(rank: int, world_size: int, port: int) -> None:
    """Test harness only: a gloo group over TCP (the library gets ranks from mona_dist.distributed)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def frozen_and_trainable(model: nn.Module) -> tuple[dict, dict]:
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trainable


def write_result(path: Path, rank: int, result: dict) -> None:
    if rank == 0:
        torch.save(result, path)
