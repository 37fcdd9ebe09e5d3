"""Monitor: rank 0 writes metrics.jsonl and TensorBoard scalars; other ranks write nothing; one place measures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mona_dist.config.schema import MonitorConfig
from mona_dist.monitor import Monitor, StepMeter, peak_memory_bytes


def record(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5, "samples_per_s": 20.0,
            "samples_per_s_rank": [12.0, 8.0], "data_wait_s": 0.01, "step_time_s": 0.2, "mem_bytes": 1 << 20,
            "skipped_samples": 3, "skipped_steps": 0}


def test_rank0_writes_jsonl_and_tensorboard(tmp_path):
    mon = Monitor(tmp_path, MonitorConfig(progress_bar=True), enabled=True, total_steps=3)
    mon.log_static(0, {"params_trainable": 1234})
    for s in (1, 2, 3):
        mon.log_step(record(s))
    mon.log_step({**record(4), "loss": math.nan, "grad_norm": None})
    mon.log_eval(3, {"eval/top1": 0.75})
    mon.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 0, "model/params_trainable": 1234}
    assert [r["step"] for r in lines[1:4]] == [1, 2, 3] and lines[2]["loss"] == 0.5
    assert lines[4]["loss"] == "nan"  # JSON has no NaN literal: written as a string, still one object per line
    assert lines[5] == {"step": 3, "eval/top1": 0.75}
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/samples_per_s_rank0",
            "perf/samples_per_s_rank1", "perf/data_wait_s", "perf/peak_mem_bytes", "data/skipped_samples",
            "model/params_trainable", "eval/top1"} <= tags
    assert [e.value for e in acc.Scalars("train/loss")][:3] == pytest.approx([1.0, 0.5, 1.0 / 3])  # float32 events
    assert [e.value for e in acc.Scalars("perf/samples_per_s_rank1")][0] == 8.0


def test_other_ranks_write_nothing(tmp_path):
    mon = Monitor(tmp_path / "out", MonitorConfig(), enabled=False, total_steps=3)
    mon.log_step(record(1))
    mon.log_eval(1, {"eval/top1": 1.0})
    mon.close()
    assert not (tmp_path / "out").exists()


def test_step_meter_single_process():
    meter = StepMeter(torch.device("cpu"))
    meter.begin()
    for _ in range(2):  # two steps of one batch each
        meter.data_start()
        meter.data_end(samples=4)
        meter.step_done()
    stats = meter.finish(skipped_samples=2)
    assert stats["samples_per_s_rank"] == [stats["samples_per_s"]] and stats["samples_per_s"] > 0
    assert stats["samples_per_s"] == pytest.approx(8 / (2 * stats["step_time_s"]), rel=1e-3)  # per-step time
    assert stats["skipped_samples"] == 2 and stats["data_wait_s"] >= 0
    assert 10 << 20 < stats["mem_bytes"] <= peak_memory_bytes(torch.device("cpu"))  # peak RSS of this process
    assert "mem_reserved_bytes" not in stats  # CUDA's caching allocator only


def test_each_interval_reports_its_own_peak():
    """begin() resets the peak: an allocation in one interval (an eval, a checkpoint gather) is not the next's."""
    import mmap

    meter = StepMeter(torch.device("cpu"))
    meter.begin()
    big = mmap.mmap(-1, 64 << 20)  # 64 MiB of its own pages (malloc may keep freed memory), all touched
    big.write(b"\1" * (64 << 20))
    first = meter.finish()["mem_bytes"]
    big.close()
    meter.begin()
    second = meter.finish()["mem_bytes"]
    assert first - second > 48 << 20, (first, second)


def test_tensorboard_follows_log_interval_while_jsonl_keeps_every_step(tmp_path):
    mon = Monitor(tmp_path, MonitorConfig(progress_bar=False), enabled=True, total_steps=5, log_interval=2)
    for s in range(1, 6):
        mon.log_step(record(s))
    mon.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 4]
