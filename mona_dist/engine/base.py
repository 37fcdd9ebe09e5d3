"""The small interface every engine offers to the loop.

The loop only ever calls: `engine(batch)` (forward under the engine's precision), `engine.accumulating(last)`,
`engine.backward(loss)`, `engine.step()` / `engine.discard_step()`, `engine.set_lr(lr)`, `engine.save(dir)` /
`engine.load(dir)` (`engine.load_resharded(dir, world_size)` for a checkpoint of another world size, where the
engine declares `reshards`), `engine.exported()` (full trainable weights, gathered under ZeRO-3) and
`engine.trainable_weights()` (what an adapter file holds: the fp32 master weights where the engine keeps them).
`engine.model` is the plain model the task built; `engine.module` is what runs the forward (a DDP/ShardedDDP/
DeepSpeed wrapper or the model itself).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from mona_dist.adapters.io import trainable_state_dict
from mona_dist.config.schema import EngineConfig


# Batch entries that stay on the host: per-sample numbers the model reads as Python values (the jitter and
# the flips). On the device, every read would make the host wait for the GPU.
HOST_KEYS = frozenset({"jitter", "photometric", "flips"})


def move_batch(batch: Any, device: torch.device, image_dtype: torch.dtype | None = None) -> Any:
    """A batch's tensors (also inside dicts/lists/tuples) to `device`, but for `HOST_KEYS`; floating `images` to
    `image_dtype` when given. Nothing else is cast: box coordinates, areas and jitter factors stay fp32 (1030.5
    is 1032 in bf16), and uint8 images become the compute dtype in the model's `DataPreprocessor`."""
    if isinstance(batch, dict):
        return {k: v if k in HOST_KEYS else _move(v, device, image_dtype if k == "images" else None)
                for k, v in batch.items()}
    return _move(batch, device, None)


def _move(obj: Any, device: torch.device, float_dtype: torch.dtype | None) -> Any:
    if isinstance(obj, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and obj.is_floating_point() else None
        return obj.to(device=device, dtype=dtype, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _move(v, device, float_dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device, float_dtype) for v in obj)
    return obj


def pick_device() -> torch.device:
    """This rank's CUDA device when CUDA exists, CPU otherwise.

    `init_distributed` already selected the GPU; with one visible GPU per task (`srun --gpus-per-task=1`) that is
    cuda:0 whatever the local rank, so the current device is used rather than `cuda:<local_rank>`.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(ABC):
    name: str = "engine"
    # True when `load_resharded` can read a checkpoint written on another world size (module docstring of
    # mona_dist/train/checkpoint.py); the generic checkpoint code asks nothing else of an engine about it.
    reshards: bool = False

    def __init__(self, model: nn.Module, cfg: EngineConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        # Pre-clip global norm of the last step, left where the engine computed it (a device tensor): reading it
        # would make the host wait for the GPU, so the loop reads it on log steps only.
        self.grad_norm: torch.Tensor | float | None = None
        self.module: nn.Module = model
        self.optimizer: torch.optim.Optimizer
        self.cudnn_benchmark = False  # set by build_engine; applies in train mode only
        self.foreach = cfg.foreach if cfg.foreach is not None else device.type == "cuda"

    # -- forward -------------------------------------------------------------------------------------------------
    def forward_context(self) -> contextlib.AbstractContextManager:
        """Autocast for the torch engines under bf16/fp16; DeepSpeed casts the weights instead."""
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.cfg.precision])

    def image_dtype(self) -> torch.dtype | None:
        """The dtype floating images are cast to on the way in (None: as they come; autocast handles them)."""
        return None

    def __call__(self, batch: Any) -> Any:
        batch = move_batch(batch, self.device, self.image_dtype())
        with self.forward_context():
            return self.module(batch)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)
        if self.device.type == "cuda":  # evaluation sees every image size: autotuning each would cost more
            torch.backends.cudnn.benchmark = mode and self.cudnn_benchmark

    # -- optimisation --------------------------------------------------------------------------------------------
    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Wraps forward+backward of one micro-batch; skips the gradient all-reduce unless `last`."""
        no_sync = getattr(self.module, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> None:
        """Clip, update, clear gradients; sets `self.grad_norm` (pre-clip global norm, not read)."""

    def discard_step(self) -> None:
        """Drop this step's gradients without updating (nan_policy=skip)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups():
            group["lr"] = lr * group.get("lr_mult", 1.0)

    @property
    def lr(self) -> float:
        group = self.param_groups()[0]
        return group["lr"] / group.get("lr_mult", 1.0)

    # -- state ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def save(self, directory: Path) -> None:
        """Collective: every rank calls it; writes this engine's state under `directory`."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Collective: restore what `save` wrote (weights_only loads; clear error on foreign/truncated files)."""

    def load_resharded(self, directory: Path, world_size: int) -> None:
        """Collective: restore what `save` wrote on `world_size` ranks into this engine on another world size.
        Engines whose `save` keeps whole (unsharded) states set `reshards` and need nothing more than `load`."""
        if not self.reshards:
            raise ValueError(f"checkpoint {directory} was written by {world_size} ranks; the {self.name} engine "
                             f"cannot load it on another world size")
        self.load(directory)

    @contextlib.contextmanager
    def exported(self) -> Iterator[nn.Module]:
        """The plain model with its trainable weights readable (ZeRO-3 gathers them for the duration)."""
        yield self.model

    def release(self) -> None:
        """Drop what this engine holds (optimizer state, gradients, wrappers) so its memory can be freed; the
        engine is unusable afterwards. The benchmark measures one method's engine with the others released."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        self.model.zero_grad(set_to_none=True)
        self.module = self.model

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """Collective: every trainable tensor, whole, on the CPU, by state_dict name. The torch engines train fp32
        weights under autocast, so these are the weights themselves."""
        with self.exported() as model:
            # copies: on the CPU, .cpu() would hand back the live weights, which the next step changes
            return {k: v.detach().to("cpu", copy=True) for k, v in trainable_state_dict(model).items()}
