"""engine/deepspeed_compat.py: each workaround, and a test that fails if DeepSpeed's own behaviour changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from mona_dist.config.schema import EngineConfig, OptimConfig
from mona_dist.engine import build_engine
from mona_dist.engine.deepspeed_compat import drop_stale_groups

DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "gradient_clipping": 0.0,
             "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


@pytest.fixture
def one_rank_env(monkeypatch):
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    yield
    if tdist.is_initialized():
        tdist.destroy_process_group()


def new_world() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)


def ds_initialize():
    import deepspeed

    model = nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=DS_CONFIG)
    loss = engine(torch.ones(2, 4)).sum()
    engine.backward(loss)
    engine.step()


@pytest.mark.slow
def test_upstream_deepspeed_reuses_a_group_of_a_destroyed_world(one_rank_env):
    """DeepSpeed 0.19 keeps the world clone of its first initialize; after the world is rebuilt it is dead. If this
    stops failing, DeepSpeed checks its cache itself and drop_stale_groups can go."""
    new_world()
    drop_stale_groups()  # an earlier test in this process may have left DeepSpeed a group of its world
    ds_initialize()
    new_world()
    with pytest.raises(ValueError, match="not registered"):
        ds_initialize()
    assert "_WORLD_GROUP" in drop_stale_groups()
    ds_initialize()  # with the stale group dropped DeepSpeed makes a new one
    assert drop_stale_groups() == []  # a live group is kept


@pytest.mark.slow
def test_our_engine_survives_a_rebuilt_world(one_rank_env):
    cfg, optim = EngineConfig(name="deepspeed", zero_stage=1), OptimConfig(lr=1e-3)
    for _ in range(2):  # two runs in one process, the group left and joined again in between
        new_world()
        model = nn.Sequential(nn.Linear(4, 4))
        engine = build_engine(model, cfg, optim, micro_batch_size=2)
        before = [p.detach().clone() for p in model.parameters()]
        loss = engine.module(torch.ones(2, 4)).sum()
        engine.backward(loss)
        engine.step()
        # the step changed every weight (AdamW's first step moves each by about lr)
        assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        # and the groups its engine and ZeRO optimizer reduce over are of this world: torch knows them, they reduce
        for group in (engine.ds.data_parallel_group, engine.ds.optimizer.dp_process_group):
            assert tdist.get_global_rank(group, 0) == 0 and tdist.get_world_size(group) == 1
            t = torch.full((1,), 3.0)
            tdist.all_reduce(t, group=group)
            assert t.item() == 3.0


@pytest.mark.slow
def test_upstream_zero2_links_moments_of_the_first_group_only(one_rank_env):
    """DeepSpeed 0.19 ZeRO-2 with two parameter groups: after a step, the second group's parameters have no Adam
    moments linked. If this stops failing, DeepSpeed links every group itself and link_optimizer_states can go."""
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state

    from mona_dist.engine.deepspeed_compat import link_optimizer_states

    new_world()
    drop_stale_groups()
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = [{"params": list(model[0].parameters()), "weight_decay": 0.05},
              {"params": list(model[1].parameters()), "weight_decay": 0.0}]
    config = {**DS_CONFIG, "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups), config=config)
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    with pytest.raises(ValueError, match="exp_avg not found"):
        safe_get_full_optimizer_state(model[1].weight, "exp_avg")
    assert link_optimizer_states(engine.optimizer, model.parameters()) == 2  # the LayerNorm's weight and bias
    for p in model.parameters():
        assert safe_get_full_optimizer_state(p, "exp_avg").shape == p.shape


def test_jit_builds_run_this_interpreters_ninja_in_the_environments_own_folder():
    """Workaround 4: every process of a run builds DeepSpeed's CPU ops with the same ninja, in one folder per venv
    (two ninjas alternating rebuilt the shm op at every process start, 80-140 s each)."""
    import shutil
    import sys

    from mona_dist.engine.deepspeed_compat import use_one_jit_build

    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "ninja").is_file()  # the venv's, from PyPI (DeepSpeed depends on it)
    env = {"PATH": os.pathsep.join(["/usr/bin", "/bin", str(bin_dir)])}
    use_one_jit_build(env)
    assert shutil.which("ninja", path=env["PATH"]) == str(bin_dir / "ninja")
    assert env["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/bin", "/bin"]  # moved to the front, not doubled
    assert env["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    before = dict(env, TORCH_EXTENSIONS_DIR="/elsewhere")
    after = dict(before)
    use_one_jit_build(after)
    assert after == before  # idempotent, and a folder the user named is kept
