"""What a task is to the trainer: a model builder, a loader builder and an evaluator, plus its head options.

A task module subclasses `Task` and registers an instance with `@register_task("name")`. The trainer calls, in
this order: `check(cfg)` at start-up (config errors surface before anything is built), `build_model(cfg)`,
`build_loader(cfg, split, dist)`, and `evaluate(model, loader, dist)` with the model in eval mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from mona_dist.config.loader import ConfigError
from mona_dist.data import is_padding
from mona_dist.data.preprocess import DataPreprocessor

if TYPE_CHECKING:
    from mona_dist.config.root import Config
    from mona_dist.distributed import DistState


class NoHeadOptions(BaseModel):
    """Tasks without head options reject any `model.head` key."""

    model_config = ConfigDict(extra="forbid")


class Task:
    """Base of every task. Subclasses set `head_options` and implement `build_model` and `evaluate`."""

    name: ClassVar[str] = ""
    head_options: ClassVar[type[BaseModel]] = NoHeadOptions
    # Training batches of one or a few shapes: cuDNN's autotuning (engine.cudnn_benchmark) then pays off.
    fixed_shape: ClassVar[bool] = False

    def options(self, cfg: Config) -> BaseModel:
        """`cfg.model.head` validated by this task's `head_options`; errors name the key (`model.head.x`)."""
        try:
            return self.head_options.model_validate(cfg.model.head)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(["model", "head", *(str(p) for p in first["loc"])])
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            raise ConfigError(key, msg) from None

    def check(self, cfg: Config) -> None:
        """Start-up validation of everything task-specific; override to add rules (call super)."""
        self.options(cfg)
        train, val = cfg.data.pipeline(self.name, "train"), cfg.data.pipeline(self.name, "val")
        for key in ("mean", "std"):  # the model normalises every batch, so both splits need the same values
            if getattr(train, key) != getattr(val, key):
                raise ConfigError(f"data.eval_pipeline.{key}", f"{getattr(val, key)} differs from the train "
                                  f"pipeline's {getattr(train, key)}; the model normalises both splits alike")

    def preprocessor(self, cfg: Config) -> DataPreprocessor:
        """The model's on-device preprocessing (detection resize, jitter, normalisation) with the pipelines' mean
        and std (data/preprocess.py)."""
        pipeline = cfg.data.pipeline(self.name, "train")
        return DataPreprocessor(pipeline.mean, pipeline.std)

    def build_model(self, cfg: Config) -> nn.Module:
        """The whole model: `model.backbone` is the Backbone; `model(batch)` in training mode returns a dict of
        scalar losses whose "loss" entry is the total."""
        raise NotImplementedError

    def build_loader(self, cfg: Config, split: str, dist: DistState) -> Any:
        """This rank's loader for `split` ("train" | "val"): the data package's streaming loader by default."""
        from mona_dist.data import build_loader

        loader = build_loader(self.name, cfg.data, split, rank=dist.rank, world_size=dist.world_size,
                              seed=cfg.train.seed)
        if split == "val" and dist.world_size > 1 and collective_forward(cfg) and loader.shards.counts is None:
            # Without sample counts no padding batches can be planned (data/plan.py): ranks would run different
            # numbers of eval forwards, each of which is collective here, and the rank with more would wait forever.
            # Every rank reads the same spec, so every rank refuses.
            engine = "ZeRO-3" if cfg.engine.name == "deepspeed" else "FSDP"
            raise ValueError(f"data.val_shards {cfg.data.val_shards}: no index with sample counts, so ranks would run "
                             f"unequal numbers of eval forwards, which hang under {engine} (every forward is "
                             f"collective); write the val shards with `mona-dist shards` (an index), or evaluate on "
                             f"one rank or under another engine")
        return loader

    def evaluate(self, model: Callable[[Any], Any], loader: Any, dist: DistState) -> dict[str, float]:
        """Every rank evaluates its share; the returned "eval/<metric>" floats are valid on rank 0 (all ranks may
        hold them). `model(batch)` runs the forward in eval mode with the engine's device and precision."""
        raise NotImplementedError

    @staticmethod
    def batch_size(batch: Any) -> int:
        """Samples in a batch: `images` is a tensor (cls, seg) or a list of tensors (coco, voc)."""
        return len(batch["images"])


def collective_forward(cfg: Config) -> bool:
    """Whether every forward is a collective under this engine: ZeRO-3 and FSDP gather the weights in it (and FSDP
    sends BatchNorm statistics before it)."""
    return cfg.engine.name == "fsdp" or (cfg.engine.name == "deepspeed" and cfg.engine.zero_stage == 3)


def scored_batches(model: Callable[[Any], Any], loader: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """(batch, model(batch)) for every batch to score. Padding batches (`data.plan`: equal val batch counts per
    rank) run through the model too, since every rank must run the same forwards under ZeRO-3, but are not yielded."""
    for batch in loader:
        out = model(batch)
        if not is_padding(batch):
            yield batch, out


T = TypeVar("T", bound=type[Task])


M = TypeVar("M", bound=nn.Module)


def unwrap(model: Any, cls: type[M]) -> M:
    """The task model of type `cls` inside engine / DDP wrappers (each exposes the one it wraps as `.module`)."""
    while not isinstance(model, cls) and hasattr(model, "module"):
        model = model.module
    return model


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: names the task and adds one instance of it to `TASKS`."""

    def deco(cls: T) -> T:
        from mona_dist.tasks import TASKS

        cls.name = name
        TASKS.add(name, cls())
        return cls

    return deco
