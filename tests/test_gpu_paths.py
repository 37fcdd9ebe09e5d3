"""The CUDA paths, run by `make gpu-check` on a GPU (MONA_DIST_TEST_GPU=1); the CPU suite skips them (conftest.py).

A few real train steps of Mona on a small Swin under each engine in bf16, and the device half of the data pipeline
on CUDA against the same arithmetic on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from mona_dist.bench.runner import BenchSpec, build_model, make_batch
from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine import build_engine

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def nccl_group(monkeypatch):
    """A one-rank NCCL group in memory, as `train.setup.join_group` makes for DeepSpeed in one process on a GPU."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    if tdist.is_initialized():
        tdist.destroy_process_group()
    tdist.init_process_group("nccl", store=tdist.HashStore(), rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


@pytest.fixture
def offload_group(monkeypatch):
    """The one-rank group `train.setup.join_group` makes for FSDP with CPU offload on a GPU: NCCL for CUDA tensors,
    gloo for the host ones (issue 25, item 1)."""
    from mona_dist.distributed import process_group_backend

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    if tdist.is_initialized():
        tdist.destroy_process_group()
    tdist.init_process_group(process_group_backend(cuda=True, cpu_collectives=True), store=tdist.HashStore(), rank=0,
                             world_size=1)
    yield
    tdist.destroy_process_group()


def train_steps(engine_cfg: EngineConfig, device: torch.device, steps: int = 8) -> None:
    """Mona on swin_nano with a segmentation head fits one fixed 64-px batch for `steps` steps: the loss falls and
    every trainable tensor (DeepSpeed: its fp32 master copy, gathered under ZeRO-3) moved and stayed finite."""
    spec = BenchSpec(backbone="swin_nano_patch4_window7", methods=["mona"], task="seg", batch_size=2, img_size=64,
                     num_classes=8)
    torch.manual_seed(0)
    model = build_model(spec, "mona", {})
    engine = build_engine(model, engine_cfg, OptimConfig(lr=1e-3, weight_decay=0.0), micro_batch_size=2,
                          device=device)
    engine.train()
    before = engine.trainable_weights()
    batch, losses = make_batch(spec, device), []
    for _ in range(steps):
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    after = engine.trainable_weights()
    engine.release()
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.9 * losses[0], losses  # one batch, fitted: the loss must fall
    assert before.keys() == after.keys() and any(k.startswith("backbone.") for k in after)  # the Monas train
    for name, w in after.items():
        assert torch.isfinite(w).all() and not torch.equal(w, before[name]), name


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_bf16_trains_on_cuda(cuda, nccl_group, stage):
    torch.cuda.reset_peak_memory_stats(cuda)
    train_steps(EngineConfig(name="deepspeed", zero_stage=stage, precision="bf16"), cuda)
    assert torch.cuda.max_memory_allocated(cuda) > 0


def test_fsdp_with_cpu_offload_trains_on_cuda(cuda, offload_group):
    """Shards, gradients and the AdamW step on the host; the gradient norm and the gathers of the trainable weights
    run on host tensors, over the group's gloo half. (One GPU: whether a one-rank NCCL-only group would refuse
    them too was not measured.)"""
    train_steps(EngineConfig(name="fsdp", offload_params=True, precision="bf16"), cuda)


def test_ddp_bf16_autocast_trains_on_cuda(cuda):
    train_steps(EngineConfig(name="ddp", precision="bf16"), cuda)


def test_ddp_forward_runs_under_bf16_autocast_on_cuda(cuda):
    engine = build_engine(torch.nn.Linear(8, 8), EngineConfig(name="ddp", precision="bf16"), OptimConfig(),
                          micro_batch_size=1, device=cuda)
    seen = {}
    engine.module.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype, weight=m.weight.dtype))
    with engine.forward_context():
        engine.module(torch.randn(2, 8, device=cuda))
    assert seen == {"dtype": torch.bfloat16, "weight": torch.float32}  # bf16 compute, fp32 master weights


def test_device_preprocessing_on_cuda_equals_the_cpu(cuda):
    from mona_dist.data.preprocess import DataPreprocessor
    from mona_dist.data.transforms import JitterDraw

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8, generator=g)
    torch.manual_seed(0)
    draws = torch.stack([JitterDraw(0.4, 0.5, 0.5, 0.1)() for _ in range(2)])
    pre = DataPreprocessor()
    sizes = [(32, 40), (24, 30)]
    on_cpu = pre(batch, img_sizes=sizes, jitter=draws)
    on_gpu = pre(batch.to(cuda), img_sizes=sizes, jitter=draws)  # draws come from the workers, on the host
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4)
    listed = pre([batch[0].to(cuda), batch[1, :, :24, :30].to(cuda)], sizes=[(48, 60), (36, 45)])  # detection
    assert [tuple(x.shape[-2:]) for x in listed] == [(48, 60), (36, 45)] and listed[0].is_cuda


def test_a_workers_0_loader_leaves_the_cuda_generator_alone(cuda, tmp_path):
    """Issue 25, item 10: the per-sample augmentation seed reseeds only the CPU generator in the trainer's
    process, so the trainer's CUDA stream (dropout masks) does not depend on the sample position."""
    from mona_dist.data import DataConfig, build_loader
    from mona_dist.data.synthetic import build

    build("cls", str(tmp_path), num_train=8, num_val=2, size=32, per_shard=8)
    cfg = DataConfig(train_shards=str(tmp_path / "shards" / "train.index.json"), batch_size=4, workers=0)
    torch.cuda.manual_seed(5)
    before = torch.cuda.get_rng_state(cuda)
    next(iter(build_loader("cls", cfg, "train", rank=0, world_size=1, seed=7)))
    assert torch.equal(torch.cuda.get_rng_state(cuda), before)


def test_deepspeed_zero2_fp16_skips_an_overflow_step_and_resumes_its_scaler(cuda, nccl_group, tmp_path):
    """Issue 25, item 11: DeepSpeed ZeRO-2 fp16, what the cls, coco and voc recipes ship. The dynamic loss scaler
    starts at 2^16 and finds a scale that trains; a step whose gradients overflow is skipped (weights unchanged) and
    lowers the scale (or first the hysteresis); a checkpoint keeps the scaler's state through the allow-listed
    loader, and a fresh engine resumes from it with the same state and weights."""
    spec = BenchSpec(backbone="swin_nano_patch4_window7", methods=["mona"], task="seg", batch_size=2, img_size=64,
                     num_classes=8)
    cfg = EngineConfig(name="deepspeed", zero_stage=2, precision="fp16")
    fields = ("cur_scale", "cur_iter", "cur_hysteresis", "last_overflow_iter")

    def engine_for():
        torch.manual_seed(0)
        engine = build_engine(build_model(spec, "mona", {}), cfg, OptimConfig(lr=1e-3, weight_decay=0.0),
                              micro_batch_size=2, device=cuda)
        engine.train()
        return engine

    def step(engine, scale=1.0) -> bool:
        """One step; True when DeepSpeed skipped it."""
        skipped = engine.ds.skipped_steps
        loss = engine(batch)["loss"]
        assert torch.isfinite(loss)
        engine.backward(loss * scale)
        engine.step()
        return engine.ds.skipped_steps > skipped

    def scaler_state(engine) -> tuple:
        scaler = engine.ds.optimizer.loss_scaler
        return tuple(getattr(scaler, k) for k in fields)

    engine, batch = engine_for(), make_batch(spec, cuda)
    assert engine.ds.optimizer.loss_scaler.dynamic and engine.ds.optimizer.loss_scaler.cur_scale == 2.0 ** 16
    start = engine.trainable_weights()
    assert not all(step(engine) for _ in range(8)), "every fp16 step overflowed"  # the scaler settles
    before = engine.trainable_weights()
    assert any(not torch.equal(start[k], before[k]) for k in start)  # a step that was not skipped moved weights
    state = scaler_state(engine)
    assert step(engine, scale=float("inf"))  # every gradient overflows: skipped
    after = engine.trainable_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lowered = scaler_state(engine)
    assert lowered[0] < state[0] or lowered[2] < state[2], (state, lowered)  # the scale, or first the hysteresis
    engine.save(tmp_path)
    engine.release()

    resumed = engine_for()
    resumed.load(tmp_path)
    assert scaler_state(resumed) == lowered
    weights = resumed.trainable_weights()
    assert all(torch.equal(weights[k], after[k]) for k in after)
    step(resumed)  # trains on (a finite loss; it may be skipped again while the scale settles)
    resumed.release()
