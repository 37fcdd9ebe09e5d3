"""The typed run configuration: one pydantic model per section, validated once at start-up.

Every section forbids unknown keys, so a typo fails at load time instead of being ignored. Rules that involve more
than one field (engine/precision/ZeRO combinations) live in `check_combinations`, one rule per line, each naming the
key the user should change. Task-specific head options stay a plain mapping here (`model.head`) and are validated by
the task itself (`Task.head_options`), so adding a task never touches this file.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated (`--set` after load)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    backbone: str = "swin_tiny_patch4_window7_224"
    method: str = "mona"
    method_options: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None
    # False: weights of another architecture (more blocks, other widths) load where they match (models/pretrained.py)
    pretrained_strict: bool = True
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    out_indices: list[int] | None = None
    # Swin only: "official" computes what the official Swin/Mona code computes (pad then shift every odd block,
    # output norms at init); "timm" what timm computes (for timm classification checkpoints). README: Pretrained.
    swin_arithmetic: Literal["official", "timm"] = "official"
    num_classes: int | None = Field(None, gt=0)
    # Task-specific head/neck options, validated by the task's `head_options` model.
    head: dict[str, Any] = Field(default_factory=dict)


class CustomKeyConfig(Section):
    """One `paramwise.custom_keys` entry: multipliers for every parameter whose name contains the key."""

    lr_mult: float = Field(1.0, ge=0.0)
    decay_mult: float = Field(1.0, ge=0.0)


class ParamwiseConfig(Section):
    """mmcv 1.x `DefaultOptimizerConstructor`'s `paramwise_cfg` (the official runs' rules, `engine/optim.py`).

    Per parameter: the longest key of `custom_keys` contained in its name wins (ties: the alphabetically first) and
    sets lr and weight decay multipliers; only a parameter no key matches gets the rules below, first match wins:
    norm layer (by module type) -> `norm_decay_mult`; depthwise Conv2d (groups == in_channels) ->
    `dwconv_decay_mult`; a parameter named `bias` -> `bias_decay_mult`. `bias_lr_mult` applies to biases outside
    norm layers. Names are matched as the official models spell them (`backbone.` + the backbone's own names).
    """

    custom_keys: dict[str, CustomKeyConfig] = Field(default_factory=dict)
    bias_lr_mult: float = Field(1.0, ge=0.0)
    bias_decay_mult: float = Field(1.0, ge=0.0)
    norm_decay_mult: float = Field(1.0, ge=0.0)
    dwconv_decay_mult: float = Field(1.0, ge=0.0)


class OptimConfig(Section):
    """AdamW over the trainable parameters only, grouped by `paramwise` (mmcv 1.x rules)."""

    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    paramwise: ParamwiseConfig = Field(default_factory=ParamwiseConfig)


class ScheduleConfig(Section):
    """mmcv 1.x LrUpdaterHook arithmetic: lr(step) = base_lr * regular(step) * warmup(step).

    `regular` decays over the whole run, warm-up included: poly `r + (1 - r) * (1 - p / P) ** power`, cosine
    `r + (1 - r) * (1 + cos(pi * p / P)) / 2` (r = min_lr_ratio), step `gamma ** (milestones passed)`. With
    `by_epoch`, p / P count epochs (the lr changes at epoch boundaries, as mmdet's step schedule), else steps.
    Warm-up multiplies on top for the first `warmup_iters` steps (epochs with `warmup_by_epoch`, as mmcls):
    `warmup_ratio + (1 - warmup_ratio) * step / warmup_iters`.
    """

    kind: Literal["cosine", "poly", "step", "constant"] = "cosine"
    by_epoch: bool = False
    warmup_iters: int = Field(0, ge=0)
    warmup_ratio: float = Field(1e-3, ge=0.0, le=1.0)
    warmup_by_epoch: bool = False
    power: float = Field(1.0, gt=0.0)
    milestones: list[int] = Field(default_factory=list)  # epochs with by_epoch, else steps
    gamma: float = Field(0.1, gt=0.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


# DeepSpeed ZeRO-1/2 bucket sizes are multiples of this (engine/deepspeed_engine.py says where DeepSpeed asks it).
ZERO_BUCKET_ALIGNMENT = 2


class EngineConfig(Section):
    name: Literal["deepspeed", "fairscale", "ddp", "fsdp"] = "deepspeed"
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False
    offload_params: bool = False  # deepspeed ZeRO-3: parameters on the CPU; fsdp: shards, grads and AdamW step there
    grad_clip: float = Field(0.0, ge=0.0)  # 0 disables clipping (DeepSpeed's own default would be 1.0)
    grad_accum: int = Field(1, ge=1)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile per block (README: Compile); not with DeepSpeed ZeRO-3
    # fsdp: free each block's gathered weights after its forward and gather them again in backward (ZeRO-3
    # memory); False keeps them from forward to backward (one all-gather fewer per block). None: True.
    reshard_after_forward: bool | None = None
    deepspeed_config: str | None = None  # JSON merged over the generated config; listed keys only (ALLOWED_OVERRIDES)
    # Cost knobs; None picks the default that the engine section of README describes.
    foreach: bool | None = None  # AdamW's multi-tensor kernels; None: on CUDA (hundreds of small adapter tensors)
    bucket_elements: int | None = Field(None, gt=0)  # ZeRO-1/2 reduce/allgather buckets; None: from trainable count
    overlap_comm: bool | None = None  # ZeRO-1/2 reduction beside backward; None: on CUDA with several ranks
    gradient_as_bucket_view: bool = True  # DDP: gradients are views into its buckets (no second copy)
    broadcast_buffers: bool | None = None  # DDP, fsdp: rank 0's (BN) buffers at each forward; None: plain BN only
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions for what runs in fp32
    cudnn_benchmark: bool | None = None  # CUDA: autotune convolutions; None: for the task's fixed-shape training


class TrainConfig(Section):
    """How long, how many images per step, and when to log, evaluate and checkpoint.

    Length: `max_steps` optimizer steps, or `epochs` passes over the training shards (steps per epoch come from the
    shard index and the global batch at start-up); set one of them, the other null.
    `global_batch` is the recipe's images per optimizer step over all ranks: each rank's share is run as
    `engine.grad_accum` micro-batches of at most `data.batch_size` images, both derived from the world size.
    Without it, a step is `data.batch_size x engine.grad_accum x world size` images. `batch_override` runs another
    global batch with the lr scaled linearly (lr x override / global_batch); the run's log says so.
    """

    max_steps: Optional[int] = Field(None, gt=0)
    epochs: Optional[int] = Field(None, gt=0)
    global_batch: Optional[int] = Field(None, gt=0)
    batch_override: Optional[int] = Field(None, gt=0)
    interval_unit: Literal["step", "epoch"] = "step"  # unit of eval_interval and ckpt_interval
    log_interval: int = Field(10, gt=0)
    eval_interval: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_at_end: bool = True
    ckpt_interval: int = Field(0, ge=0)  # 0: no periodic checkpoints
    keep_last: int = Field(3, ge=1)
    seed: int = 0
    nan_policy: Literal["stop", "skip"] = "stop"

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(f"set train.max_steps ({self.max_steps}) or train.epochs ({self.epochs}), not both "
                             "(set the other to null)")
        if self.max_steps is None and self.epochs is None:
            object.__setattr__(self, "max_steps", 100)
        if self.batch_override is not None and self.global_batch is None:
            raise ValueError("train.batch_override needs train.global_batch (the recipe's batch the lr belongs to)")
        return self


class MonitorConfig(Section):
    tensorboard: bool = True
    jsonl: bool = True
    progress_bar: bool = True


def combination_errors(engine: EngineConfig, train: TrainConfig | None = None) -> list[tuple[str, str]]:
    """(key, reason) for every field combination that cannot run; empty when the config is coherent."""
    e, errors = engine, []
    if e.name == "ddp" and e.zero_stage > 0:
        errors.append(("engine.zero_stage", f"ZeRO-{e.zero_stage} needs engine.name deepspeed or fairscale, not ddp"))
    if e.name == "fairscale" and e.zero_stage == 3:
        errors.append(("engine.zero_stage", "ZeRO-3 is not available with the fairscale engine (its FSDP needs CUDA); use deepspeed"))
    if e.name == "fairscale" and e.zero_stage == 0:
        errors.append(("engine.zero_stage", "the fairscale engine shards optimizer state: use stage 1 or 2, or engine.name=ddp"))
    if e.name == "fairscale" and e.precision == "fp16":
        errors.append(("engine.precision", "fp16 is not supported with the fairscale engine; use bf16 or fp32"))
    if e.name == "fsdp" and e.zero_stage != 0:
        errors.append(("engine.zero_stage", "fsdp shards parameters, gradients and optimizer state by itself (as "
                       "ZeRO-3): set engine.zero_stage=0 with it (engine.reshard_after_forward=false: fewer "
                       "all-gathers)"))
    if e.name == "fsdp" and e.offload_optimizer:
        errors.append(("engine.offload_optimizer", "fsdp offloads shards, gradients and the optimizer step together: "
                       "set engine.offload_params instead"))
    elif e.name not in ("deepspeed", "fsdp") and (e.offload_optimizer or e.offload_params):
        key = "engine.offload_optimizer" if e.offload_optimizer else "engine.offload_params"
        errors.append((key, f"offload needs engine.name=deepspeed or fsdp, not {e.name}"))
    if e.name != "fsdp" and e.reshard_after_forward is not None:
        errors.append(("engine.reshard_after_forward", f"applies to engine.name=fsdp, not {e.name}"))
    if e.compile and e.name == "deepspeed" and e.zero_stage == 3:
        # DeepSpeed 0.19 ZeRO-3 gathers weights in hooks on every submodule, inside the compiled block; they fail
        # there (measured: AttributeError '_in_forward'). FSDP's hooks sit on the compiled block, outside it.
        errors.append(("engine.compile", "does not work with DeepSpeed ZeRO-3 (its parameter hooks fail inside a "
                       "compiled block); use engine.name=fsdp or ZeRO 0-2"))
    if e.name == "deepspeed" and e.offload_optimizer and e.zero_stage == 0:
        errors.append(("engine.offload_optimizer", "optimizer offload needs engine.zero_stage >= 1"))
    if e.name == "deepspeed" and e.offload_params and e.zero_stage != 3:
        errors.append(("engine.offload_params", "parameter offload needs engine.zero_stage 3"))
    if e.bucket_elements is not None and e.bucket_elements % ZERO_BUCKET_ALIGNMENT:
        errors.append(("engine.bucket_elements", f"must be a multiple of {ZERO_BUCKET_ALIGNMENT} (DeepSpeed's ZeRO-1/2 "
                       f"aligns its buckets to 4 bytes), not {e.bucket_elements}"))
    for key in ("bucket_elements", "overlap_comm"):
        if e.name != "deepspeed" and getattr(e, key) is not None:
            errors.append((f"engine.{key}", f"ZeRO's communication buckets need engine.name=deepspeed, not {e.name}"))
    if e.name != "deepspeed" and e.deepspeed_config:
        errors.append(("engine.deepspeed_config", f"a DeepSpeed JSON needs engine.name=deepspeed, not {e.name}"))
    if train is not None and train.global_batch is not None and e.grad_accum != 1:
        errors.append(("engine.grad_accum", "is derived from train.global_batch and the world size; leave it at 1"))
    if train is not None and train.nan_policy == "skip" and e.name == "deepspeed" and e.grad_accum > 1:
        # DeepSpeed has no public way to drop gradients already reduced for earlier micro-batches of a step.
        errors.append(("train.nan_policy", "skip needs engine.grad_accum 1 with the deepspeed engine"))
    return errors
