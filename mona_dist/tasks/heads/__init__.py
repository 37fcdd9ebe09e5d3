"""Necks and adapters that put mona_dist backbones under mmseg and mmdet models.

    pyramid.SimpleFeaturePyramid   four stride-16 ViT maps -> strides 4/8/16/32
    mmdet_detector.MMDetDetector   an mmdet detector behind the mona_dist batch contract (the one boundary)
"""

from __future__ import annotations

import os

from ...config.loader import ConfigError


def class_count(cfg) -> int:
    """`model.num_classes`, else the length of the class list in the train shards' index (how the data package
    maps labels), so a config for a converted data set needs no class count. A model with fewer classes than that
    list is refused here, at start-up (its labels would fail mid-run, or be scored wrongly)."""
    from ...data import resolve_shards
    from ...data.index import INDEX_SUFFIX

    given, spec = cfg.model.num_classes, cfg.data.train_shards
    classes = None
    # with a class count given, only an index (a file, or a directory holding one) is read: shards without one
    # would be counted sample by sample here, and have no class list anyway
    if given is None or spec.endswith(INDEX_SUFFIX) or os.path.isdir(os.path.expanduser(spec)):
        try:
            classes = resolve_shards(spec).classes
        except (OSError, ValueError):
            if given is None:
                raise  # no train shards here (eval or predict elsewhere) only matters without a count
    if given is None:
        if not classes:
            raise ConfigError("model.num_classes", "required: the train shards' index has no class list")
        return len(classes)
    if classes and len(classes) > given:
        raise ConfigError("model.num_classes", f"{given}, but the train shards' index ({spec}) "
                          f"lists {len(classes)} classes")
    return given
