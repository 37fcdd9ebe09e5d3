"""Image classification: a linear head on the globally pooled last-stage features of the backbone.

Training returns the cross-entropy (optional label smoothing); eval mode returns the logits. Top-1/top-5 are
counted on every rank over its share of the validation set and the counts are summed over ranks, so the accuracy
is exactly the single-process one whatever the world size.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as tdist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from mona_dist.config.loader import ConfigError
from mona_dist.data.preprocess import DataPreprocessor
from mona_dist.models import Backbone, build_backbone
from mona_dist.tasks.base import Task, register_task, scored_batches
from mona_dist.tasks.heads import class_count


class ClsHeadOptions(BaseModel):
    """`model.head` of a cls config."""

    model_config = ConfigDict(extra="forbid")

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # before the linear layer


class Classifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, head: ClsHeadOptions,
                 preprocessor: DataPreprocessor | None = None):
        super().__init__()
        self.preprocess = preprocessor or DataPreprocessor()
        self.backbone = backbone
        self.dropout = nn.Dropout(head.dropout)
        self.head = nn.Linear(backbone.out_channels[-1], num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.label_smoothing = head.label_smoothing

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone(images)[-1].mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        return self.head(self.dropout(pooled))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.logits(self.preprocess(batch["images"], jitter=batch.get("jitter")))
        if not self.training:
            return {"logits": logits}
        loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
        return {"loss": loss}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the k largest logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels[:, None])
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


@register_task("cls")
class ClsTask(Task):
    head_options = ClsHeadOptions
    fixed_shape = True  # every training crop has the pipeline's size

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.model.num_classes is None:
            raise ConfigError("model.num_classes", "required for the cls task")
        class_count(cfg)  # more classes in the shards than the head has: refused now, not mid-run

    def build_model(self, cfg) -> Classifier:
        m = cfg.model
        backbone = build_backbone(m.backbone, m.method, pretrained=m.pretrained,
                                  # a classifier reads only the last stage; the others would be computed for nothing
                                  out_indices=tuple(m.out_indices) if m.out_indices is not None else (-1,),
                                  drop_path_rate=m.drop_path_rate, swin_arithmetic=m.swin_arithmetic,
                                  **m.method_options)
        return Classifier(backbone, m.num_classes, self.options(cfg), self.preprocessor(cfg))

    @torch.no_grad()
    def evaluate(self, model: Callable[[Any], Any], loader: Any, dist) -> dict[str, float]:
        counts = torch.zeros(3, dtype=torch.float64)  # top1, top5, samples
        for batch, out in scored_batches(model, loader):
            logits = out["logits"].float().cpu()
            top1, top5 = topk_correct(logits, batch["labels"].cpu())
            counts += torch.tensor([top1, top5, len(logits)], dtype=torch.float64)
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
            counts = counts.to(device)
            tdist.all_reduce(counts)
            counts = counts.cpu()
        n = max(counts[2].item(), 1.0)
        return {"eval/top1": counts[0].item() / n, "eval/top5": counts[1].item() / n, "eval/samples": counts[2].item()}
