"""The whole run configuration: the sections of `schema.py` plus the data section owned by `mona_dist.data`."""

from __future__ import annotations

from pydantic import Field

from mona_dist.config.schema import (
    EngineConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    ScheduleConfig,
    Section,
    TrainConfig,
)
from mona_dist.data.config import DataConfig


class Config(Section):
    task: str
    output_dir: str = "runs/default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
