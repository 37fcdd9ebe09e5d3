"""mona_dist backbones and the ViT pyramid neck, built from plain mmseg config dicts."""

import pytest
import torch

from mona_dist.tasks import mmseg_registry  # noqa: F401  (registers MonaSwin, MonaViT, SimpleFeaturePyramid)
from mona_dist.tasks.mmcv_compat import import_models


def _models():
    import_models("mmseg")
    from mmseg.registry import MODELS

    return MODELS


def test_mona_swin_builds_from_an_mmseg_config():
    bb = _models().build(dict(type="MonaSwin", arch="swin_nano_patch4_window7", method="mona", drop_path_rate=0.1))
    feats = bb(torch.randn(1, 3, 64, 64))
    assert isinstance(feats, tuple) and [f.shape[1] for f in feats] == bb.out_channels == [32, 64, 128, 256]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all(".post_attn." in n or ".post_mlp." in n for n in trainable)


def test_mona_vit_with_the_pyramid_neck():
    models = _models()
    bb = models.build(dict(type="MonaViT", arch="vit_nano_patch16", method="lora", method_options={"rank": 4}))
    neck = models.build(dict(type="SimpleFeaturePyramid", in_channels=bb.out_channels))
    feats = neck(bb(torch.randn(1, 3, 64, 64)))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]


def test_family_mismatch_is_one_line_error():
    with pytest.raises(ValueError, match="MonaSwin takes a swin arch"):
        _models().build(dict(type="MonaSwin", arch="vit_nano_patch16"))
