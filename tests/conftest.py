"""Suite-wide settings. Subfolders keep their own fixtures in their own conftest.py."""

import os
from pathlib import Path

import pytest

# The suite is the CPU suite: on a GPU host, tests (and every process they start, which inherits this
# environment) must not pick NCCL, SyncBN or cuda:N under a CPU DeepSpeed. `make gpu-check` sets
# MONA_DIST_TEST_GPU=1 and runs the tests marked `gpu`, which see the GPUs.
GPU_RUN = os.environ.get("MONA_DIST_TEST_GPU") == "1"
if not GPU_RUN:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # DeepSpeed picks its accelerator at import; the CPU suite runs it on CPU (gloo).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Two cores here: keep each test process to one intra-op thread so multi-rank tests don't oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from mona_dist.engine.deepspeed_compat import use_one_jit_build  # noqa: E402

torch.set_num_threads(1)
# DeepSpeed's CPU ops built once in .venv/torch_extensions with the venv's ninja, by this process and every one it
# starts (deepspeed_compat.py, workaround 4): tests that call deepspeed.initialize directly get it too.
use_one_jit_build()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only with MONA_DIST_TEST_GPU=1 on a machine with CUDA; elsewhere they skip, saying why."""
    if GPU_RUN and torch.cuda.is_available():
        return
    reason = ("no CUDA device visible" if GPU_RUN else
              "CPU suite: CUDA hidden (run `make gpu-check`, which sets MONA_DIST_TEST_GPU=1, on a GPU machine)")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords hold every parent node's name, the checkout's folder too
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _leave_the_process_group():
    """A test that ran `train()` or a command in this process leaves its group and takes back the rank variables
    `init_distributed` exported, as `mona-dist` does at the end of every command: the next test starts clean (a
    leaked LOCAL_WORLD_SIZE=1 once broke every later 2-rank test spawned from this process)."""
    yield
    from mona_dist import distributed

    distributed.leave(wait_for_peers=False)


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """(task, num_train, num_val, size, per_shard) -> the output directory (source/ and shards/) of
    `mona_dist.data.synthetic.build` for those sizes, written once per session with the user-facing writer."""
    from mona_dist.data import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    built: dict[tuple, Path] = {}

    def get(task: str, num_train: int, num_val: int, size: int, per_shard: int) -> Path:
        key = (task, num_train, num_val, size, per_shard)
        if key not in built:
            out = root / "-".join(map(str, key))
            synthetic.build(task, str(out), num_train=num_train, num_val=num_val, size=size, seed=0,
                            per_shard=per_shard)
            built[key] = out
        return built[key]

    return get


@pytest.fixture
def one_gloo_rank(monkeypatch):
    """This process as rank 0 of a world of 1 (a gloo group over an in-memory store, the launcher's variables set),
    as `mona-dist train` on one process; the group is destroyed afterwards."""
    import torch.distributed as tdist

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    if tdist.is_initialized():
        tdist.destroy_process_group()
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    yield
    if tdist.is_initialized():
        tdist.destroy_process_group()
