"""DeepSpeed: ZeRO stages 0-3, bf16/fp16, optimizer and parameter offload, from our typed config.

The DeepSpeed JSON is generated from `EngineConfig`; `engine.deepspeed_config` may name a JSON file whose keys are
deep-merged over it, restricted to the keys in `ALLOWED_OVERRIDES` (DeepSpeed imports modules that some of its
keys name, and writes files where others point). `gradient_clipping` is always written: DeepSpeed >= 0.19.3 would
otherwise clip at 1.0. Checkpoints use DeepSpeed's own sharded format (`<dir>/engine/`), without the frozen weights,
read back through `SafeCheckpointEngine` (weights_only). Where that format is sharded by rank (ZeRO 1-3, DeepSpeed's
bf16 optimizer), rank 0 also writes `trainable_state.pt`: the whole fp32 master weights and Adam moments of the
trainable parameters, gathered through DeepSpeed's `safe_get_full_*` API (PETL state is small). A resume on another
world size loads that (`load_resharded`); the same world size loads DeepSpeed's own shards (bitwise).
Gradients are reduced in fp32 under bf16/fp16 too (`communication_data_type`; DeepSpeed 0.19 would use the compute
dtype), as FSDP (`reduce_dtype`) and DDP (fp32 masters) reduce them; the override file may set it back.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from torch import nn

from mona_dist.adapters.io import clean_name
from mona_dist.config.loader import ConfigError, deep_merge
from mona_dist.config.schema import ZERO_BUCKET_ALIGNMENT, EngineConfig, OptimConfig
from mona_dist.engine.base import DTYPES, Engine
from mona_dist.engine.deepspeed_compat import (drop_stale_groups, link_optimizer_states, release_cpu_allreduce_buffer,
                                              use_one_jit_build)
from mona_dist.engine.optim import build_adamw, param_groups
from mona_dist.engine.precision import match_engine_dtype
from mona_dist.serialization import safe_torch_load

TAG = "engine"
GATHERED = "trainable_state.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")
_SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")

# engine.deepspeed_config may set these and nothing else: each is a number, a bool or a dtype name that changes
# how DeepSpeed communicates or scales losses. What we derive (stage, batch sizes, precision switch, offload,
# clipping) has its own engine.* key; what imports code (torch_autocast's module names), writes files elsewhere
# (monitors, profilers, NVMe offload paths) or changes what is trained (optimizer, scheduler) is refused.
ALLOWED_OVERRIDES: dict[str, set[str] | None] = {
    "zero_optimization": {
        "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients", "reduce_scatter",
        "allgather_partitions", "round_robin_gradients", "sub_group_size", "stage3_param_persistence_threshold",
        "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
        "stage3_model_persistence_threshold", "zero_hpz_partition_size", "use_multi_rank_bucket_allreduce",
        "zero_quantized_weights", "zero_quantized_gradients", "elastic_checkpoint",
    },
    "fp16": {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale"},
    "bf16": {"enabled", "immediate_grad_update"},
    "communication_data_type": None, "prescale_gradients": None, "gradient_predivide_factor": None,
    "steps_per_print": None, "wall_clock_breakdown": None, "memory_breakdown": None,
}
_DERIVED = {"train_batch_size": "train.global_batch / data.batch_size", "train_micro_batch_size_per_gpu":
            "data.batch_size", "gradient_accumulation_steps": "train.global_batch", "gradient_clipping":
            "engine.grad_clip", "zero_optimization.stage": "engine.zero_stage", "zero_optimization.offload_optimizer":
            "engine.offload_optimizer", "zero_optimization.offload_param": "engine.offload_params"}


def check_override(override: dict[str, Any], path: Path) -> None:
    """One ConfigError line for the first key of a user's DeepSpeed JSON that is not in ALLOWED_OVERRIDES."""
    for key, value in override.items():
        if key not in ALLOWED_OVERRIDES:
            _refuse(key, path)
        allowed = ALLOWED_OVERRIDES[key]
        if allowed is None:
            _check_leaf(key, value, path)
            continue
        if not isinstance(value, dict):
            raise ConfigError("engine.deepspeed_config", f"{path}: {key} must be a JSON object")
        for sub, leaf in value.items():
            if sub not in allowed:
                _refuse(f"{key}.{sub}", path)
            _check_leaf(f"{key}.{sub}", leaf, path)


def _check_leaf(key: str, value: Any, path: Path) -> None:
    if not isinstance(value, (bool, int, float, str)):
        raise ConfigError("engine.deepspeed_config", f"{path}: {key} must be a number, a bool or a string")


def _refuse(key: str, path: Path) -> None:
    hint = f"set {_DERIVED[key]} instead" if key in _DERIVED else "not among the keys mona-dist passes on " \
        "(docs/engines.md: DeepSpeed JSON overrides)"
    raise ConfigError("engine.deepspeed_config", f"{path}: {key} is not accepted: {hint}")


DEFAULT_BUCKET = 500_000_000  # DeepSpeed's own ZeRO-1/2 reduce/allgather bucket, in elements
MIN_BUCKET = 1 << 20
# What DeepSpeed 0.19.8 requires of the two bucket sizes (read in its code, checked by tests/engine/test_buckets.py
# against DeepSpeed's own ZeRO initialization for every shipped recipe):
# - runtime/zero/stage_1_and_2.py, DeepSpeedZeroOptimizer.__init__ (lines 387-391): `nccl_start_alignment_factor
#   = 2  # 4-byte alignment/sizeof(fp16)` then `assert allgather_bucket_size % nccl_start_alignment_factor == 0`,
#   for every dtype (fp32 and bf16 too) and both stages 1 and 2;
# - runtime/zero/config.py, DeepSpeedZeroConfig (lines 113, 132): reduce_bucket_size > 0, allgather_bucket_size
#   >= 0; runtime/utils.py all_gather_dp_groups (line 1033) divides by allgather_bucket_size, so > 0 in practice.
# ZeRO-3 (stage3.py) and the bf16 optimizer (bf16_optimizer.py) take both sizes as they come.
# ZERO_BUCKET_ALIGNMENT (config/schema.py, which checks engine.bucket_elements with it) holds that 2.


def bucket_elements(trainable: int, largest: int) -> int:
    """ZeRO-1/2 reduce/allgather bucket size from what trains: a quarter of the trainable elements, so reduction
    can start while backward still runs, never below one tensor (`largest`) or 2^20, never above DeepSpeed's 5e8,
    rounded up to DeepSpeed's alignment (ZERO_BUCKET_ALIGNMENT: an odd count of trainable elements gave an odd
    bucket, which DeepSpeed's ZeRO-1/2 optimizer refuses at start). DeepSpeed allocates its 5e8 default on the
    device whatever trains: 1-2 GB for a few million adapter weights."""
    size = min(DEFAULT_BUCKET, max(MIN_BUCKET, largest, -(-trainable // 4)))
    return int(-(-size // ZERO_BUCKET_ALIGNMENT) * ZERO_BUCKET_ALIGNMENT)


def check_bucket(key: str, value: Any, where: str) -> None:
    """One ConfigError line for a bucket size DeepSpeed would refuse (the constraints above): every size positive,
    the allgather bucket also a multiple of ZERO_BUCKET_ALIGNMENT."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON's 5e8 is a float; DeepSpeed's config reads an integral float as an int
    step = ZERO_BUCKET_ALIGNMENT if key.endswith("allgather_bucket_size") else 1
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % step:
        rule = f"a positive multiple of {step} (DeepSpeed's ZeRO-1/2 aligns it to 4 bytes)" if step > 1 else \
            "a positive whole number"
        raise ConfigError(where, f"{key} must be {rule}, not {value!r}")


def deepspeed_config(cfg: EngineConfig, micro_batch_size: int, world_size: int, trainable: int = 0,
                     largest: int = 0, cuda: bool | None = None) -> dict[str, Any]:
    """Our config -> DeepSpeed's JSON dict, with the user's override file merged on top and checked.

    `trainable` / `largest`: trainable element count and largest trainable tensor (bucket sizes; 0: DeepSpeed's
    defaults); `cuda`: whether the run is on a GPU (default: CUDA is available)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        if cfg.bucket_elements is not None or trainable:
            size = cfg.bucket_elements or bucket_elements(trainable, largest)
            zero.update(reduce_bucket_size=size, allgather_bucket_size=size)
        # Overlapping needs a second stream and something to overlap with: other ranks, on a GPU.
        zero["overlap_comm"] = cfg.overlap_comm if cfg.overlap_comm is not None else (cuda and world_size > 1)
    elif cfg.overlap_comm is not None:
        zero["overlap_comm"] = cfg.overlap_comm
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 16},
        # Gradients are reduced in fp32 as under FSDP (reduce_dtype) and DDP (fp32 masters under autocast);
        # DeepSpeed 0.19 would reduce them in the compute dtype. The override file may set "bf16" or "fp16".
        "communication_data_type": "fp32",
        # We hand DeepSpeed an AdamW over the trainable parameters only (torch's, or DeepSpeedCPUAdam offloaded).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            override = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("engine.deepspeed_config", f"file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError("engine.deepspeed_config", f"{path} is not valid JSON (line {err.lineno})") from None
        if not isinstance(override, dict):
            raise ConfigError("engine.deepspeed_config", f"{path} must hold a JSON object")
        check_override(override, path)
        ds = deep_merge(ds, override)
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if key in override.get("zero_optimization", {}):
                check_bucket(f"{path}: zero_optimization.{key}", override["zero_optimization"][key],
                             "engine.deepspeed_config")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError("engine.deepspeed_config", "enables both fp16 and bf16; pick one (engine.precision)")
    return ds


def model_deepspeed_config(model: nn.Module, cfg: EngineConfig, micro_batch_size: int, world_size: int,
                           device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON the engine hands DeepSpeed for this model: buckets sized from its trainable tensors."""
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    return deepspeed_config(cfg, micro_batch_size, world_size, sum(trainable), max(trainable, default=0),
                            cuda=device.type == "cuda")


def cpu_adam(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    """DeepSpeed's vectorised C++ AdamW for optimizer state offloaded to the CPU: torch's AdamW would step the
    offloaded fp32 state one tensor at a time in Python. Its op is built with ninja and a C++ compiler on first
    use (about two minutes) unless DeepSpeed was installed with DS_BUILD_CPU_ADAM=1."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    try:
        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, adamw_mode=True)
    except Exception as err:  # the JIT build reports through several exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("engine.offload_optimizer", f"DeepSpeedCPUAdam's C++ op could not be built or loaded "
                          f"({first}); it needs ninja and a C++ compiler, or DeepSpeed installed with "
                          f"DS_BUILD_CPU_ADAM=1") from None


def _deepspeed_safe_globals() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its checkpoints; nothing else may be rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, reading with weights_only=True (its own uses weights_only=False)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location or "cpu", allowed=_deepspeed_safe_globals())


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    reshards = True  # through the gathered trainable state (module docstring)

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, device: torch.device,
                 micro_batch_size: int, world_size: int):
        super().__init__(model.to(device), cfg, device)
        self.ds_config = model_deepspeed_config(self.model, cfg, micro_batch_size, world_size, device)
        groups = param_groups(self.model, optim)
        optimizer = cpu_adam(groups, optim) if cfg.offload_optimizer else build_adamw(groups, optim, self.foreach)
        drop_stale_groups()  # groups DeepSpeed cached from a process group destroyed since (deepspeed_compat.py)
        use_one_jit_build()  # its CPU ops built once per environment, not again by every process (deepspeed_compat.py)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=self.ds_config)
        release_cpu_allreduce_buffer()  # DeepSpeed's CPU all-reduce never unlinks its /dev/shm buffers
        self.ds.checkpoint_engine = SafeCheckpointEngine(self.ds._config)
        self.module = self.ds
        self._dtype = next((DTYPES[k] for k in ("bf16", "fp16") if self.ds_config[k].get("enabled")), None)
        if self._dtype is not None:
            match_engine_dtype(self.model, self._dtype)  # DeepSpeed cast the parameters only

    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed holds bf16/fp16 weights; images are cast instead

    def image_dtype(self) -> torch.dtype | None:
        return self._dtype

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed defers the reduction to the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1/grad_accum
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # only advances DeepSpeed's micro-step counter

    def step(self) -> None:
        assert self.ds.is_gradient_accumulation_boundary(), "step() before the last micro-batch's backward()"
        self.ds.step()
        self.grad_norm = self.ds.get_global_grad_norm()  # a tensor or a float, as DeepSpeed's optimizer keeps it

    def discard_step(self) -> None:
        # Reached only with grad_accum == 1 (config rule), where no backward ran this step: nothing to drop.
        self.ds.zero_grad()

    def release(self) -> None:
        # DeepSpeed's own teardown removes its hooks and buffers (ZeRO-3's parameter coordinator, IPG buckets)
        destroy = getattr(self.ds, "destroy", None)
        if destroy is not None:
            destroy()
        self.module = self.ds = self.optimizer = None  # type: ignore[assignment]
        self.model.zero_grad(set_to_none=True)

    def save(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=TAG, save_latest=False, exclude_frozen_parameters=True)
        if self._sharded():
            state = self._full_state()  # collective
            if torch.distributed.get_rank() == 0:
                torch.save(state, Path(directory) / GATHERED)

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {clean_name(n): p for n, p in self.model.named_parameters() if p.requires_grad}

    def _sharded(self) -> bool:
        """Whether DeepSpeed's own state is cut by rank: ZeRO 1-3 and its bf16 optimizer map each parameter to
        partitions (`_hp_mapping`, ZeRO-3's `ds_id`); ZeRO-0's fp32/fp16/bf16 wrappers keep whole states."""
        return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in self._trainable().values())

    def _full_state(self) -> dict[str, Any]:
        """Collective: fp32 masters and Adam moments of every trainable parameter, whole, on the CPU."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        base = self.ds.optimizer.optimizer
        moments = bool(base.state)  # empty before the first step, on every rank alike
        out: dict[str, Any] = {"weights": {}, **{k: {} for k in MOMENTS}}
        if moments:
            link_optimizer_states(self.ds.optimizer, self._trainable().values())  # deepspeed_compat.py, 3
        for name, p in self._trainable().items():  # the same order on every rank: each call is collective
            out["weights"][name] = safe_get_full_fp32_param(p).float().cpu()
            for key in MOMENTS if moments else ():
                out[key][name] = safe_get_full_optimizer_state(p, key).float().cpu()
        step = next(iter(base.state.values()), {}).get("step", 0)
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        out["step"] = int(step.item() if torch.is_tensor(step) else step)
        out["loss_scaler"] = {k: float(getattr(scaler, k)) for k in _SCALER if hasattr(scaler, k)} if scaler else {}
        out["counters"] = {k: int(getattr(self.ds, k, 0)) for k in _COUNTERS}
        return out

    def load_resharded(self, directory: Path, world_size: int) -> None:
        if not self._sharded():
            self.load(directory)  # ZeRO-0: DeepSpeed's state is whole (mp_rank_00), any world size reads it
            return
        path = Path(directory) / GATHERED
        if not path.is_file():
            raise ValueError(f"checkpoint {directory} has no {GATHERED} (written before mona-dist saved it), so it "
                             f"loads only on the {world_size} ranks that wrote it")
        state = safe_torch_load(path)
        if not isinstance(state, dict) or not {"weights", "step", *MOMENTS} <= state.keys():
            raise ValueError(f"{path} is not a mona-dist gathered DeepSpeed state")
        self._load_full_state(state, str(path))

    def _load_full_state(self, state: dict[str, Any], source: str) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = self._trainable()
        if set(state["weights"]) != set(params):
            odd = sorted(set(state["weights"]) ^ set(params))
            raise ValueError(f"{source} does not fit this model ({len(odd)} names differ, e.g. {odd[0]})")
        opt = self.ds.optimizer
        if state["exp_avg"]:
            self._create_moments(opt, state["step"])
        with torch.no_grad():
            for name, p in params.items():
                safe_set_full_fp32_param(p, state["weights"][name].to(self.device))
                for key in MOMENTS if state["exp_avg"] else ():
                    safe_set_full_optimizer_state(p, state[key][name].to(self.device), key)
            # the forward's copies (bf16/fp16 or fp32 partitions) follow the masters
            gather = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0) \
                if self.cfg.zero_stage == 3 else contextlib.nullcontext()
            with gather:
                if self.cfg.zero_stage != 3 or torch.distributed.get_rank() == 0:
                    for name, p in params.items():
                        p.data.copy_(state["weights"][name].to(p.device, p.dtype))
        scaler = getattr(opt, "loss_scaler", None)
        for key, value in state.get("loss_scaler", {}).items():
            if scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, type(getattr(scaler, key))(value))
        for key, value in state.get("counters", {}).items():
            setattr(self.ds, key, value)

    def _create_moments(self, opt: Any, step: int) -> None:
        """Adam's state as the first step would create it (DeepSpeed creates it lazily), with the saved step
        count, linked to the parameters' partitions so that `safe_set_full_optimizer_state` can fill it."""
        base = opt.optimizer
        flats = list(getattr(opt, "fp32_partitioned_groups_flat", None) or
                     [g["params"][0] for g in base.param_groups if g["params"]])
        count: Any = step if type(base).__name__ == "DeepSpeedCPUAdam" else torch.tensor(float(step))
        for flat in flats:
            if not base.state.get(flat):
                base.state[flat] = {"step": count, **{k: torch.zeros_like(flat) for k in MOMENTS}}
        # ZeRO 1-2 / bf16 optimizer: link the parameters to the state just made; ZeRO-3 reads base.state directly
        link_optimizer_states(opt, self._trainable().values())

    def load(self, directory: Path) -> None:
        if not (Path(directory) / TAG).is_dir():
            raise ValueError(f"checkpoint {directory} has no DeepSpeed state ({TAG}/); was it written by another engine?")
        path, _ = self.ds.load_checkpoint(str(directory), tag=TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"checkpoint {directory}/{TAG} could not be loaded by DeepSpeed")

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """Collective: DeepSpeed's fp32 master copies (ZeRO 1-3 and its bf16 optimizer keep them; each is
        assembled from the ranks' shards), not the bf16/fp16 weights the forward uses; fp32 runs without a
        partitioning optimizer hold no copy and give the weights themselves."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:  # same order on every rank: each call is collective
                master = safe_get_full_fp32_param(param)
                out[clean_name(name)] = (master if master is not None else param.detach()).to("cpu", torch.float32, copy=True)
        return out

    @contextlib.contextmanager
    def exported(self) -> Iterator[nn.Module]:
        if self.cfg.zero_stage == 3:
            params = [p for p in self.model.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield self.model
        else:
            yield self.model
