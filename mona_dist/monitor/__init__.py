"""Monitoring: TensorBoard, metrics.jsonl and a progress bar on rank 0; throughput and memory measured in one place."""

from mona_dist.monitor.metrics import (StepMeter, peak_memory_bytes, reserved_memory_bytes, reset_peak_memory,
                                       resolve_grad_norms)
from mona_dist.monitor.writers import TB_TAGS, Monitor

__all__ = ["Monitor", "StepMeter", "TB_TAGS", "peak_memory_bytes", "reserved_memory_bytes", "reset_peak_memory",
           "resolve_grad_norms"]
