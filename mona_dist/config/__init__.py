"""Typed run configuration: `load_config(path, overrides)` -> `Config`, errors as one `ConfigError` line.

`schema` holds the sections (engine, optim, ...) and imports nothing else of ours, so engine code can use them
alone; `Config`, the root, also pulls in `mona_dist.data.config.DataConfig` and is imported on first use
(`mona_dist.config.Config` or `from mona_dist.config.root import Config`).
"""

from __future__ import annotations

from typing import Any

from mona_dist.config.loader import (
    ConfigError,
    apply_overrides,
    deep_merge,
    dump_config,
    load_config,
    read_yaml,
    validate,
)
from mona_dist.config.schema import (
    EngineConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    combination_errors,
)

__all__ = [
    "Config",
    "EngineConfig",
    "ModelConfig",
    "MonitorConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "combination_errors",
    "ConfigError",
    "apply_overrides",
    "deep_merge",
    "dump_config",
    "load_config",
    "read_yaml",
    "validate",
]


def __getattr__(name: str) -> Any:
    if name == "Config":
        from mona_dist.config.root import Config

        return Config
    raise AttributeError(f"module 'mona_dist.config' has no attribute {name!r}")
