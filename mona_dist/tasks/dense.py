"""The dense tasks (seg, coco, voc): an OpenMMLab network (mmseg, mmdet) on a mona_dist backbone.

What they share lives here: the class count comes from `model.num_classes` or the train shards' class list (checked
at start-up), and the model is the task's builder called with the config's backbone options, head options and
preprocessor. A dense task states only its builder, head options and evaluation.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from torch import nn

from .base import Task
from .heads import class_count


class DenseTask(Task):
    """Base of seg, coco and voc. Subclasses set `builder` (staticmethod: backbone name, method, class count,
    head options, preprocessor= and the backbone keywords -> the model), `head_options` and `evaluate`."""

    builder: ClassVar[Callable[..., nn.Module]]

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        class_count(cfg)  # no class count and no class list, or fewer classes than the shards list: refused now

    def build_model(self, cfg: Any) -> nn.Module:
        m = cfg.model
        return self.builder(
            m.backbone, m.method, class_count(cfg), self.options(cfg), pretrained=m.pretrained,
            drop_path_rate=m.drop_path_rate, out_indices=m.out_indices, method_options=m.method_options,
            swin_arithmetic=m.swin_arithmetic, preprocessor=self.preprocessor(cfg),
        )
