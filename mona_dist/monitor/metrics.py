"""The one place that measures throughput, data-wait time and peak memory (torchtitan's metrics module as anchor).

Each rank times its own steps; `StepMeter.finish` turns them into one record for the step with one collective
(`all_gather` of four numbers), so rank 0 can log the global and per-rank throughput and the MAX memory over ranks.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA max allocated on GPU (what the papers report), peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def _gather(values: list[float], device: torch.device) -> list[list[float]]:
    """[rank][i] of every rank's `values`; just `[values]` in a single process."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [values]
    backend_device = device if tdist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.float64, device=backend_device)
    out = [torch.empty_like(mine) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, mine)
    return [t.tolist() for t in out]


@dataclass
class StepMeter:
    """Times one optimizer step on this rank: call `data_start/data_end` around each batch fetch."""

    device: torch.device
    _t0: float = field(default_factory=time.perf_counter)
    _data_t0: float = 0.0
    data_wait: float = 0.0
    samples: int = 0

    def start(self) -> None:
        self._t0, self.data_wait, self.samples = time.perf_counter(), 0.0, 0

    def data_start(self) -> None:
        self._data_t0 = time.perf_counter()

    def data_end(self, samples: int) -> None:
        self.data_wait += time.perf_counter() - self._data_t0
        self.samples += samples

    def finish(self, skipped_samples: int = 0) -> dict[str, float | list[float]]:
        """Collective: throughput (global = sum over ranks), per-rank throughput, data wait, MAX memory, and the
        loaders' skipped-sample counters summed over ranks."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        mem = peak_memory_bytes(self.device)
        rows = _gather([self.samples / elapsed, self.data_wait, float(mem), float(skipped_samples)], self.device)
        per_rank = [r[0] for r in rows]
        return {
            "samples_per_s": sum(per_rank),
            "samples_per_s_rank": per_rank,
            "data_wait_s": max(r[1] for r in rows),
            "step_time_s": elapsed,
            "mem_bytes": int(max(r[2] for r in rows)),
            "skipped_samples": int(sum(r[3] for r in rows)),
        }
