"""The one place that measures throughput, data-wait time and peak memory (torchtitan's metrics module as anchor).

Measuring costs host syncs (waiting for the GPU to time it, reading memory counters, gathering the ranks' numbers),
so it happens on log steps only: `StepMeter` covers the interval since `begin()`, and `finish` turns it into one
record with one collective (`all_gather` of six numbers), so rank 0 can log the global and per-rank throughput and
the MAX memory over ranks. `begin()` also resets the memory peaks: each record's peak is that interval's, without
the evaluations and checkpoint gathers in between.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from mona_dist.host_sync import host_values, synchronize, to_host

_CLEAR_REFS, _STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocated/reserved peaks, or the process's peak RSS (VmHWM) on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # elsewhere the peak runs since the start of the process


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last reset: CUDA max allocated on GPU (what the papers report), peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def reserved_memory_bytes(device: torch.device) -> int | None:
    """CUDA's peak reserved memory (what the caching allocator holds: allocated plus its cache); None on CPU."""
    return int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None


def _gather(values: list[float], device: torch.device) -> list[list[float]]:
    """[rank][i] of every rank's `values`; just `[values]` in a single process."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [values]
    backend_device = device if tdist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.float64, device=backend_device)
    out = [torch.empty_like(mine) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, mine)
    return host_values(to_host(torch.stack(out), "meter_gather"))


@dataclass
class StepMeter:
    """Times this rank's optimizer steps since `begin()`: call `data_start/data_end` around each batch fetch and
    `step_done()` after each step; `finish()` (collective) on log steps."""

    device: torch.device
    _t0: float = field(default_factory=time.perf_counter)
    _data_t0: float = 0.0
    data_wait: float = 0.0
    samples: int = 0
    steps: int = 0

    def begin(self) -> None:
        """A new interval: timers, counters and memory peaks start again."""
        reset_peak_memory(self.device)
        self._t0, self.data_wait, self.samples, self.steps = time.perf_counter(), 0.0, 0, 0

    def data_start(self) -> None:
        self._data_t0 = time.perf_counter()

    def data_end(self, samples: int) -> None:
        self.data_wait += time.perf_counter() - self._data_t0
        self.samples += samples

    def step_done(self) -> None:
        self.steps += 1

    def finish(self, skipped_samples: int = 0) -> dict[str, Any]:
        """Collective: the interval's throughput (global = sum over ranks), per-rank throughput, data wait and step
        time per step, MAX peak memory over ranks (allocated; reserved on CUDA), and the loaders' skipped-sample
        counters summed over ranks."""
        synchronize(self.device, "meter_sync")  # the GPU's queued work belongs to this interval
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        steps = max(self.steps, 1)
        reserved = reserved_memory_bytes(self.device)
        rows = _gather([self.samples / elapsed, self.data_wait / steps, float(peak_memory_bytes(self.device)),
                        float(skipped_samples), elapsed / steps, float(reserved or 0)], self.device)
        per_rank = [r[0] for r in rows]
        record = {
            "samples_per_s": sum(per_rank),
            "samples_per_s_rank": per_rank,
            "data_wait_s": max(r[1] for r in rows),
            "step_time_s": max(r[4] for r in rows),
            "mem_bytes": int(max(r[2] for r in rows)),
            "skipped_samples": int(sum(r[3] for r in rows)),
        }
        if reserved is not None:
            record["mem_reserved_bytes"] = int(max(r[5] for r in rows))
        return record


def resolve_grad_norms(records: list[dict[str, Any]]) -> None:
    """Replace the device tensors in the records' "grad_norm" by floats, with one device-to-host copy for all."""
    pending = [r for r in records if isinstance(r.get("grad_norm"), torch.Tensor)]
    if pending:
        values = host_values(to_host(torch.stack([r["grad_norm"].float().reshape(()) for r in pending]), "grad_norm"))
        for record, value in zip(pending, values):
            record["grad_norm"] = value
