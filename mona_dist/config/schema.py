"""The typed run configuration: one pydantic model per section, validated once at start-up.

Every section forbids unknown keys, so a typo fails at load time instead of being ignored. Rules that involve more
than one field (engine/precision/ZeRO combinations) live in `check_combinations`, one rule per line, each naming the
key the user should change. Task-specific head options stay a plain mapping here (`model.head`) and are validated by
the task itself (`Task.head_options`), so adding a task never touches this file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated (`--set` after load)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    backbone: str = "swin_tiny_patch4_window7_224"
    method: str = "mona"
    method_options: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    out_indices: list[int] | None = None
    num_classes: int | None = Field(None, gt=0)
    # Task-specific head/neck options, validated by the task's `head_options` model.
    head: dict[str, Any] = Field(default_factory=dict)


class OptimConfig(Section):
    """AdamW over the trainable parameters only."""

    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    # Parameter-name prefix -> learning-rate multiplier (e.g. {"head": 10.0}); the longest matching prefix wins.
    lr_mult: dict[str, float] = Field(default_factory=dict)


class ScheduleConfig(Section):
    """Learning-rate factor per optimizer step: linear warm-up, then `kind` decays towards `min_lr_ratio`."""

    kind: Literal["cosine", "poly", "step", "constant"] = "cosine"
    warmup_iters: int = Field(0, ge=0)
    warmup_start: float = Field(1e-3, ge=0.0, le=1.0)
    power: float = Field(1.0, gt=0.0)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class EngineConfig(Section):
    name: Literal["deepspeed", "fairscale", "ddp"] = "deepspeed"
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_clip: float = Field(0.0, ge=0.0)  # 0 disables clipping (DeepSpeed's own default would be 1.0)
    grad_accum: int = Field(1, ge=1)
    activation_checkpointing: bool = False
    deepspeed_config: str | None = None  # JSON whose keys override the generated DeepSpeed config
    # Cost knobs; None picks the default that the engine section of README describes.
    foreach: bool | None = None  # AdamW's multi-tensor kernels; None: on CUDA (hundreds of small adapter tensors)
    bucket_elements: int | None = Field(None, gt=0)  # ZeRO-1/2 reduce/allgather buckets; None: from trainable count
    overlap_comm: bool | None = None  # ZeRO-1/2 reduction beside backward; None: on CUDA with several ranks
    gradient_as_bucket_view: bool = True  # DDP: gradients are views into its buckets (no second copy)
    broadcast_buffers: bool | None = None  # DDP: rank 0's buffers at each forward; None: only for plain BatchNorm
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions for what runs in fp32
    cudnn_benchmark: bool | None = None  # CUDA: autotune convolutions; None: for the task's fixed-shape training


class TrainConfig(Section):
    max_steps: int = Field(100, gt=0)
    log_interval: int = Field(10, gt=0)
    eval_interval: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_at_end: bool = True
    ckpt_interval: int = Field(0, ge=0)  # 0: no periodic checkpoints
    keep_last: int = Field(3, ge=1)
    seed: int = 0
    nan_policy: Literal["stop", "skip"] = "stop"


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
    if e.name != "deepspeed" and (e.offload_optimizer or e.offload_params):
        key = "engine.offload_optimizer" if e.offload_optimizer else "engine.offload_params"
        errors.append((key, f"offload needs engine.name=deepspeed, not {e.name}"))
    if e.name == "deepspeed" and e.offload_optimizer and e.zero_stage == 0:
        errors.append(("engine.offload_optimizer", "optimizer offload needs engine.zero_stage >= 1"))
    if e.name == "deepspeed" and e.offload_params and e.zero_stage != 3:
        errors.append(("engine.offload_params", "parameter offload needs engine.zero_stage 3"))
    for key in ("bucket_elements", "overlap_comm"):
        if e.name != "deepspeed" and getattr(e, key) is not None:
            errors.append((f"engine.{key}", f"ZeRO's communication buckets need engine.name=deepspeed, not {e.name}"))
    if e.name != "deepspeed" and e.deepspeed_config:
        errors.append(("engine.deepspeed_config", f"a DeepSpeed JSON needs engine.name=deepspeed, not {e.name}"))
    if train is not None and train.nan_policy == "skip" and e.name == "deepspeed" and e.grad_accum > 1:
        # DeepSpeed has no public way to drop gradients already reduced for earlier micro-batches of a step.
        errors.append(("train.nan_policy", "skip needs engine.grad_accum 1 with the deepspeed engine"))
    return errors
