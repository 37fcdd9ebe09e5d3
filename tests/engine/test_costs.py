"""What the engines cost on a GPU, as config-visible choices: ZeRO buckets, overlap, AdamW's kernels, DDP's copies,
optimizer offload, TF32 and cuDNN autotuning. The choices are checked here; their effect needs a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine import build_engine
from mona_dist.engine.base import move_batch
from mona_dist.engine.ddp_engine import needs_buffer_broadcast
from mona_dist.engine.deepspeed_engine import DEFAULT_BUCKET, bucket_elements, deepspeed_config

MONA_SWIN_L = 5_267_712  # trainable backbone elements (REFERENCE.md)


def zero(stage: int, world: int = 8, cuda: bool = True, trainable: int = MONA_SWIN_L, largest: int = 1536 * 64,
         **engine) -> dict:
    ds = deepspeed_config(EngineConfig(zero_stage=stage, **engine), 2, world, trainable, largest, cuda=cuda)
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed's own parser takes every key we write
    return ds["zero_optimization"]


def test_zero_buckets_are_sized_from_what_trains():
    z = zero(2)
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == -(-MONA_SWIN_L // 4)  # not DeepSpeed's 5e8
    assert z["reduce_bucket_size"] * 2 < 3 << 20  # 2.6 MB per bf16 bucket instead of 1 GB
    assert zero(1, trainable=195_000_000, largest=9_437_184)["reduce_bucket_size"] == 48_750_000  # full Swin-L
    assert zero(2, trainable=1000, largest=1000)["reduce_bucket_size"] == 1 << 20  # a floor for tiny heads
    assert zero(2, trainable=10**10, largest=10**6)["reduce_bucket_size"] == DEFAULT_BUCKET  # never above 5e8
    assert bucket_elements(400, 10**7) == 10**7  # never below one tensor
    assert zero(2, bucket_elements=12345)["reduce_bucket_size"] == 12345  # engine.bucket_elements wins
    assert "reduce_bucket_size" not in zero(3) and "reduce_bucket_size" not in zero(0)


def test_overlap_comm_where_there_is_something_to_overlap_with():
    assert zero(2)["overlap_comm"] is True
    assert zero(2, world=1)["overlap_comm"] is False  # nothing to reduce with
    assert zero(2, cuda=False)["overlap_comm"] is False  # gloo on CPU: no second stream
    assert zero(1, world=1, overlap_comm=True)["overlap_comm"] is True
    assert "overlap_comm" not in zero(3)  # DeepSpeed's ZeRO-3 default (on) stays


def test_user_json_still_overrides_the_buckets(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"reduce_bucket_size": 777}}')
    ds = deepspeed_config(EngineConfig(zero_stage=2, deepspeed_config=str(path)), 2, 8, MONA_SWIN_L, 1, cuda=True)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 777


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_adamw_foreach_is_a_config_choice_off_on_cpu_by_default():
    auto = build_engine(toy(), EngineConfig(name="ddp"), OptimConfig(), micro_batch_size=1)
    assert auto.optimizer.defaults["foreach"] is False  # CPU; on CUDA the default is True
    on = build_engine(toy(), EngineConfig(name="ddp", foreach=True), OptimConfig(), micro_batch_size=1)
    assert on.optimizer.defaults["foreach"] is True
    assert not auto.cudnn_benchmark and not on.cudnn_benchmark  # CUDA only


def test_only_plain_batchnorm_needs_ddp_to_broadcast_buffers():
    from mona_dist.models import build_backbone

    assert not needs_buffer_broadcast(build_backbone("swin_nano_patch4_window7", "mona"))
    assert needs_buffer_broadcast(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert not needs_buffer_broadcast(nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4)))
    assert not needs_buffer_broadcast(nn.BatchNorm2d(4, track_running_stats=False))


def test_move_batch_casts_images_only_and_leaves_host_entries_on_the_host():
    boxes = torch.tensor([[1030.5, 2.25, 1100.75, 40.125]])
    batch = {"images": [torch.rand(3, 4, 4)], "jitter": torch.rand(1, 8), "flips": torch.tensor([True]),
             "targets": [{"boxes": boxes, "area": torch.tensor([3.3])}], "labels": torch.tensor([1])}
    out = move_batch(batch, torch.device("cpu"), torch.bfloat16)
    assert out["images"][0].dtype == torch.bfloat16
    assert torch.equal(out["targets"][0]["boxes"], boxes)  # 1030.5 would be 1032 in bf16
    assert out["targets"][0]["area"].dtype == out["jitter"].dtype == torch.float32
    assert out["jitter"] is batch["jitter"] and out["flips"] is batch["flips"]


@pytest.mark.slow
def test_optimizer_offload_steps_deepspeeds_cpu_adam_like_torchs_adamw():
    """DeepSpeedCPUAdam (its C++ op is built on first use, about two minutes) over our parameter groups: the same
    update as torch's AdamW, decay and no-decay groups included."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from mona_dist.engine.deepspeed_engine import cpu_adam
    from mona_dist.engine.optim import build_adamw, param_groups

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    a, b = toy(), toy()
    ours, reference = cpu_adam(param_groups(a, cfg), cfg), build_adamw(param_groups(b, cfg), cfg)
    assert isinstance(ours, DeepSpeedCPUAdam)
    for step in range(3):
        for model, opt in ((a, ours), (b, reference)):
            torch.manual_seed(step)
            model(torch.randn(8, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tf32_and_cudnn_autotuning_on_cuda():
    device = torch.device("cuda", torch.cuda.current_device())
    fixed = build_engine(toy(), EngineConfig(name="ddp", tf32=True), OptimConfig(), micro_batch_size=1,
                         device=device, fixed_shape=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert fixed.optimizer.defaults["foreach"] is True
    fixed.train(True)
    assert torch.backends.cudnn.benchmark
    fixed.train(False)  # evaluation sees every image size
    assert not torch.backends.cudnn.benchmark
    varied = build_engine(toy(), EngineConfig(name="ddp", tf32=False), OptimConfig(), micro_batch_size=1,
                          device=device, fixed_shape=False)
    varied.train(True)
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32


def test_cost_keys_are_checked_at_load_time(tmp_path):
    from mona_dist.config import load_config
    from mona_dist.config.loader import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("task: cls\ndata: {train_shards: data/x/train.index.json}\n"
                    "engine: {name: deepspeed, zero_stage: 2}\n")
    assert load_config(path, ["engine.bucket_elements=4096"]).engine.bucket_elements == 4096
    for bad, key in (("engine.bucket_elements=0", "engine.bucket_elements"),
                     ("engine.foreach=maybe", "engine.foreach")):
        with pytest.raises(ConfigError, match=key):
            load_config(path, [bad])
    with pytest.raises(ConfigError, match="engine.overlap_comm: .*need engine.name=deepspeed, not ddp"):
        load_config(path, ["engine.name=ddp", "engine.zero_stage=0", "engine.overlap_comm=true"])
