"""DeepSpeed's gradient reduction dtype and its fp16 loss-scaler state in checkpoints (issue 25, items 9 and 11).

The fp16 train steps themselves (a skipped overflow step, a resume with the scaler's state) need CUDA: DeepSpeed's
CPU accelerator has no fp16. They are in tests/test_gpu_paths.py, run by `make gpu-check`.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine import build_engine
from mona_dist.engine.deepspeed_engine import SafeCheckpointEngine, _deepspeed_safe_globals, deepspeed_config
from mona_dist.serialization import safe_torch_load


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gradients_are_reduced_in_fp32_unless_the_override_file_says_otherwise(tmp_path, precision):
    cfg = EngineConfig(name="deepspeed", zero_stage=2, precision=precision)
    assert deepspeed_config(cfg, 2, 64)["communication_data_type"] == "fp32"
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"communication_data_type": "bf16"}))
    cfg = EngineConfig(name="deepspeed", zero_stage=2, precision=precision, deepspeed_config=str(override))
    assert deepspeed_config(cfg, 2, 64)["communication_data_type"] == "bf16"


@pytest.mark.slow
def test_the_real_zero2_bf16_engine_reduces_in_fp32(one_gloo_rank):
    torch.manual_seed(0)
    engine = build_engine(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)),
                          EngineConfig(name="deepspeed", zero_stage=2, precision="bf16"), OptimConfig(lr=1e-3),
                          micro_batch_size=2, device=torch.device("cpu"))
    assert engine.ds.communication_data_type == torch.float32  # DeepSpeed 0.19's own default: bfloat16
    assert engine.ds.optimizer.communication_data_type == torch.float32  # what ZeRO-2 reduces its buckets in
    loss = engine.module(torch.ones(2, 8, dtype=torch.bfloat16)).float().sum()
    engine.backward(loss)
    engine.step()  # a step runs with the fp32 reduction
    assert torch.isfinite(engine.grad_norm).all()
    engine.release()


def zero2_fp16_optimizer_state() -> dict:
    """What DeepSpeed 0.19's ZeRO-2 optimizer pickles for an fp16 run (`stage_1_and_2.state_dict`): its dynamic
    loss scaler object, after an overflow halved the scale, beside the ZeRO bookkeeping."""
    from deepspeed.runtime.config import get_float16_config
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    ds = deepspeed_config(EngineConfig(name="deepspeed", zero_stage=2, precision="fp16"), 2, 1)
    scaler = CreateLossScaler(torch.half, 0, True, get_float16_config(ds).dynamic_loss_scale_args())
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter = 2.0 ** 15, 7, 6  # one overflow, skipped
    return {"loss_scaler": scaler, "dynamic_loss_scale": True, "overflow": False, "clip_grad": 0.0,
            "zero_stage": ZeroStageEnum.gradients, "partition_count": [1], "ds_version": "0.19.8",
            "single_partition_of_fp32_groups": [torch.zeros(4)],
            "param_slice_mappings": [{"head.weight": fragment_address(numel=4, start=0)}]}


def test_the_fp16_loss_scaler_state_loads_through_the_allow_list(tmp_path):
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": zero2_fp16_optimizer_state()}, path)
    loaded = SafeCheckpointEngine.load(SafeCheckpointEngine.__new__(SafeCheckpointEngine), str(path))
    scaler = loaded["optimizer_state_dict"]["loss_scaler"]
    assert type(scaler).__name__ == "DynamicLossScaler"
    assert (scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter) == (2.0 ** 15, 7, 6)
    assert scaler.dtype == torch.half and scaler.dynamic
    assert loaded["optimizer_state_dict"]["param_slice_mappings"][0]["head.weight"].numel == 4
    with pytest.raises(ValueError, match="DynamicLossScaler"):  # without the allow-list it is refused
        safe_torch_load(path)
    assert {c.__name__ for c in _deepspeed_safe_globals()} >= {"DynamicLossScaler", "LossScaler"}
