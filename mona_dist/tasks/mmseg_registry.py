"""mona_dist backbones (and the ViT feature pyramid) in mmseg's model registry.

Importing this module registers, in `mmseg.registry.MODELS`:
- `MonaSwin` / `MonaViT`: `build_backbone(arch, method, ...)` as an mmseg backbone (returns a tuple of NCHW maps);
- `SimpleFeaturePyramid`: the ×4/×2/×1/×½ neck that turns a ViT's four stride-16 maps into a pyramid.

So an mmseg config can read

    custom_imports = dict(imports=["mona_dist.tasks.mmseg_registry"])
    model = dict(backbone=dict(type="MonaSwin", arch="swin_large_patch4_window7_224", method="mona",
                               drop_path_rate=0.2), ...)

Weights load through `pretrained=` (mona_dist's loader), never mmengine's `load_checkpoint` (broken on torch >= 2.6).
"""

from __future__ import annotations

import torch
from mmengine.model import BaseModule

from ..models import backbone_spec, build_backbone
from .heads.pyramid import SimpleFeaturePyramid
from . import mmcv_compat

mmcv_compat.install()
from mmseg.registry import MODELS  # noqa: E402  (after mmcv's kernels, in case this pulls in mmseg.models)


class _MonaBackbone(BaseModule):
    """An mmseg backbone around a mona_dist `Backbone` (kept as `self.body`)."""

    family: str = ""

    def __init__(
        self,
        arch: str,
        method: str = "mona",
        pretrained: str | None = None,
        out_indices: list[int] | tuple[int, ...] | None = None,
        drop_path_rate: float = 0.0,
        method_options: dict | None = None,
        swin_arithmetic: str = "official",
        init_cfg: dict | None = None,
    ):
        super().__init__(init_cfg=init_cfg)
        if backbone_spec(arch).family != self.family:
            raise ValueError(f"{type(self).__name__} takes a {self.family} arch, got {arch!r}")
        self.body = build_backbone(
            arch,
            method,
            pretrained=pretrained,
            out_indices=tuple(out_indices) if out_indices is not None else None,
            drop_path_rate=drop_path_rate,
            swin_arithmetic=swin_arithmetic,
            **(method_options or {}),
        )
        self.out_channels = self.body.out_channels
        self.out_strides = self.body.out_strides

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.body(images))


class MonaSwin(_MonaBackbone):
    """A timm Swin with a tuning method; outputs strides 4/8/16/32."""

    family = "swin"


class MonaViT(_MonaBackbone):
    """A timm ViT with a tuning method; four stride-16 outputs (add `SimpleFeaturePyramid` as the neck)."""

    family = "vit"


class MMSegSimpleFeaturePyramid(SimpleFeaturePyramid):
    """`SimpleFeaturePyramid` returning a tuple, as mmseg necks do."""

    def forward(self, feats):
        return tuple(super().forward(feats))


for _name, _cls in (("MonaSwin", MonaSwin), ("MonaViT", MonaViT), ("SimpleFeaturePyramid", MMSegSimpleFeaturePyramid)):
    if MODELS.get(_name) is not _cls:
        MODELS.register_module(name=_name, module=_cls)
