"""The two doors through which code that runs every step reads tensor values on the host.

Reading a CUDA tensor's value (`.item()`, `.tolist()`, `float(t)`, `bool(t)`, `.cpu()`) or calling
`torch.cuda.synchronize` makes the host wait until the GPU has finished everything queued so far: the next step's
kernels are not queued in the meantime. The training loop allows itself one such wait per optimizer step (the
agreement on loss, non-finite flag and pre-emption) and a few more on log steps, and says so in a test:

- `to_host(t, site)`: the deliberate device -> host copies, counted in `SYNCS` under `site` (on a CPU run too,
  so the count can be checked where there is no GPU);
- `host_values(t)`: values of a tensor that lives on the host by contract (the batch's `jitter` draws and
  `flips`, the result of an all-reduce over gloo): no wait, and an error if a device tensor arrives, since that
  would be a hidden sync.

`tests/train/test_host_syncs.py` also watches every other value read from mona_dist code during training steps.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

SYNCS: Counter[str] = Counter()


def to_host(t: torch.Tensor, site: str) -> torch.Tensor:
    """`t` copied to the CPU: one host wait when `t` is on a GPU (counted in `SYNCS[site]` on any device)."""
    SYNCS[site] += 1
    return t.detach().to("cpu")


def to_numpy(t: torch.Tensor, site: str) -> Any:
    """`to_host(t, site)` as a numpy array (for libraries that take numpy, e.g. mmdet's BitmapMasks)."""
    return to_host(t, site).numpy()


def synchronize(device: torch.device, site: str) -> None:
    """Wait for `device` (a no-op on the CPU, counted either way)."""
    SYNCS[site] += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_values(t: torch.Tensor) -> Any:
    """`t.tolist()` for a tensor that is on the CPU; a tensor on a device is an error (it would be a host sync)."""
    if t.device.type != "cpu":
        raise ValueError(f"host_values: expected a tensor on the CPU, got one on {t.device} (a hidden host sync)")
    return t.tolist()
