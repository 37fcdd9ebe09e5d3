"""Where the numbers go: TensorBoard (`<out>/tb/`), `<out>/metrics.jsonl` and a tqdm bar, all on rank 0 only.

Other ranks get a `Monitor` whose methods do nothing, so the loop never branches on the rank to log.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from mona_dist.config.schema import MonitorConfig

# Record keys -> TensorBoard tags; anything else in a record (e.g. eval/...) keeps its own name.
TB_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "samples_per_s": "perf/samples_per_s",
    "data_wait_s": "perf/data_wait_s",
    "step_time_s": "perf/step_time_s",
    "mem_bytes": "perf/peak_mem_bytes",
    "mem_reserved_bytes": "perf/peak_mem_reserved_bytes",
    "skipped_samples": "data/skipped_samples",
    "skipped_steps": "train/skipped_steps",
}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": JSON has no literal for them
    return value


class Monitor:
    """Rank-0 sink for per-step and eval records; `enabled=False` makes every call a no-op."""

    def __init__(self, out_dir: str | Path, cfg: MonitorConfig, enabled: bool, total_steps: int, start_step: int = 0,
                 log_interval: int = 1):
        self.enabled, self.log_interval = enabled, log_interval
        self.tb = self.jsonl = self.bar = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        if cfg.jsonl:
            path = out / "metrics.jsonl"
            # A resumed run appends; a run killed mid-line leaves a partial record, which must not swallow ours.
            partial = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
            self.jsonl = open(path, "a", buffering=1)
            if partial:
                self.jsonl.write("\n")
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log_static(self, step: int, values: dict[str, float]) -> None:
        """Once-per-run numbers (trainable parameters, ...): TensorBoard scalars and a jsonl record."""
        if self.enabled:
            self._write(step, {"step": step, **{f"model/{k}": v for k, v in values.items()}})

    def log_step(self, record: dict[str, Any]) -> None:
        """One optimizer step: `record` has at least step, loss, lr, grad_norm; on log steps also the interval's
        samples_per_s, mem_bytes, ... (`StepMeter.finish`)."""
        if not self.enabled:
            return
        # metrics.jsonl gets every step; TensorBoard every `log_interval` steps (and the first).
        step = record["step"]
        self._write(step, record, tensorboard=step % self.log_interval == 0 or step == 1)
        if self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
            if "samples_per_s" in record:
                self._sps = record["samples_per_s"]
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 sps=f"{getattr(self, '_sps', float('nan')):.1f}")

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write(step, {"step": step, **metrics})
        if self.bar is not None:
            self.bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def message(self, text: str, error: bool = False) -> None:
        """A line for the user (stderr when `error`) that does not break the progress bar."""
        if not self.enabled:
            return
        stream = sys.stderr if error else sys.stdout
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def _write(self, step: int, record: dict[str, Any], tensorboard: bool = True) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        if self.tb is not None and tensorboard:
            for key, value in record.items():
                if key == "step" or value is None:
                    continue
                if key == "samples_per_s_rank":
                    for rank, v in enumerate(value):
                        self.tb.add_scalar(f"perf/samples_per_s_rank{rank}", v, step)
                elif isinstance(value, (int, float)):
                    self.tb.add_scalar(TB_TAGS.get(key, key), value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        self.tb = self.jsonl = self.bar = None
