"""Necks and adapters that put mona_dist backbones under mmseg and mmdet models.

    pyramid.SimpleFeaturePyramid   four stride-16 ViT maps -> strides 4/8/16/32
    mmdet_detector.MMDetDetector   an mmdet detector behind the mona_dist batch contract (the one boundary)
"""

from __future__ import annotations

from ...config.loader import ConfigError


def class_count(cfg) -> int:
    """`model.num_classes`, else the length of the class list in the train shards' index (how the data package
    maps labels), so a config for a converted data set needs no class count. A model with fewer classes than that
    list is refused here, at start-up (its labels would fail mid-run, or be scored wrongly)."""
    from ...data import resolve_shards

    given = cfg.model.num_classes
    try:
        classes = resolve_shards(cfg.data.train_shards).classes
    except (OSError, ValueError):
        if given is None:
            raise
        classes = None  # no train shards here (eval or predict elsewhere): nothing to compare with
    if given is None:
        if not classes:
            raise ConfigError("model.num_classes", "required: the train shards' index has no class list")
        return len(classes)
    if classes and len(classes) > given:
        raise ConfigError("model.num_classes", f"{given}, but the train shards' index ({cfg.data.train_shards}) "
                          f"lists {len(classes)} classes")
    return given
