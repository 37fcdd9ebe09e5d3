"""Necks and adapters that put mona_dist backbones under mmseg and mmdet models.

    pyramid.SimpleFeaturePyramid   four stride-16 ViT maps -> strides 4/8/16/32
    mmdet_detector.MMDetDetector   an mmdet detector behind the mona_dist batch contract (the one boundary)
"""

from __future__ import annotations

from ...config.loader import ConfigError


def class_count(cfg) -> int:
    """`model.num_classes`, else the length of the class list in the train shards' index (how the data package
    maps labels), so a config for a converted data set needs no class count."""
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    from ...data import resolve_shards

    classes = resolve_shards(cfg.data.train_shards).classes
    if not classes:
        raise ConfigError("model.num_classes", "required: the train shards' index has no class list")
    return len(classes)
