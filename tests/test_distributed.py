"""mona_dist.distributed: every launcher's variables map to the same DistState; a real 2-rank gloo group forms."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mona_dist import distributed, gpu_binding
from mona_dist.distributed import DistState, detect, first_host, slurm_port, tasks_per_node
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# What srun put in each task's environment on the local 2-node test cluster (`srun` of
# `sbatch --nodes=2 --ntasks-per-node=1`), trimmed to the variables that matter; rank 1 shown.
SRUN_TASK_ENV = {
    "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NODELIST": "node[1-2]", "SLURM_NODEID": "1",
    "SLURM_LOCALID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
}
# The batch shell of the same job: SLURM_PROCID=0 and SLURM_NTASKS=2, but no step.
BATCH_SHELL_ENV = {k: v for k, v in SRUN_TASK_ENV.items() if "STEP" not in k} | {"SLURM_PROCID": "0",
                                                                                 "SLURM_NODEID": "0"}


def test_single_process_without_any_launcher():
    state = detect({})
    assert state == DistState(0, 0, 1, 1, 0, "127.0.0.1", 29500, "single")
    assert state.is_main and not state.distributed


def test_torchrun_mapping():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "abc"}
    assert detect(env) == DistState(5, 1, 8, 4, 1, "10.0.0.7", 29400, "torchrun")
    assert not detect(env).is_main and detect(env).distributed


def test_deepspeed_launcher_mapping():
    # deepspeed/launcher/launch.py sets LOCAL_SIZE and CROSS_RANK, not LOCAL_WORLD_SIZE/GROUP_RANK.
    env = {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert detect(env) == DistState(6, 2, 8, 4, 1, "node1", 29500, "deepspeed")


def test_plain_env_convention_infers_node_rank():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    state = detect(env)
    assert (state.node_rank, state.master_addr, state.master_port, state.launcher) == (1, "127.0.0.1", 29500,
                                                                                       "torchrun")


def test_slurm_srun_task_mapping():
    state = detect(SRUN_TASK_ENV)
    assert state == DistState(1, 0, 2, 1, 1, "node1", slurm_port(42), "slurm")
    rank0 = detect(SRUN_TASK_ENV | {"SLURM_PROCID": "0", "SLURM_NODEID": "0"})
    assert rank0.is_main and (rank0.master_addr, rank0.master_port) == (state.master_addr, state.master_port)


def test_slurm_eight_tasks_per_node():
    env = SRUN_TASK_ENV | {"SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_STEP_NODELIST": "gpu[07-10]",
                           "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NODEID": "1", "SLURM_NTASKS": "32",
                           "SLURM_STEP_NUM_TASKS": "32", "SLURM_NTASKS_PER_NODE": "8",
                           "SLURM_STEP_TASKS_PER_NODE": "8(x4)"}
    assert detect(env) == DistState(13, 5, 32, 8, 1, "gpu07", slurm_port(42), "slurm")


def test_slurm_uneven_tasks_per_node_uses_this_nodes_count():
    env = {k: v for k, v in SRUN_TASK_ENV.items() if k != "SLURM_NTASKS_PER_NODE"}
    env |= {"SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3",
            "SLURM_PROCID": "6", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[1-4]"}
    state = detect(env)
    assert (state.world_size, state.local_world_size, state.node_rank, state.master_addr) == (7, 1, 3, "n1")


def test_batch_shell_is_a_single_process_not_rank_zero_of_two():
    assert detect(BATCH_SHELL_ENV).launcher == "single"
    assert detect(BATCH_SHELL_ENV).world_size == 1


def test_launcher_variables_win_over_slurm():
    # torchrun started by srun, one per node, inside an sbatch allocation: SLURM vars describe the torchrun agents.
    env = SRUN_TASK_ENV | {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                           "GROUP_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29501",
                           "TORCHELASTIC_RUN_ID": "42"}
    assert detect(env) == DistState(3, 1, 4, 2, 1, "node1", 29501, "torchrun")


def test_slurm_master_overrides_from_environment():
    state = detect(SRUN_TASK_ENV | {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "12345"})
    assert (state.master_addr, state.master_port, state.launcher) == ("10.1.2.3", 12345, "slurm")


def test_slurm_port_is_deterministic_and_differs_across_jobs_and_requeues():
    assert slurm_port(1234) == slurm_port(1234)
    ports = {slurm_port(j, r) for j in range(1000, 1050) for r in range(3)}
    assert len(ports) > 140  # 150 (job, restart) pairs; a few random collisions are tolerable
    assert all(20000 <= p < 32000 for p in ports)
    requeued = detect(SRUN_TASK_ENV | {"SLURM_RESTART_COUNT": "1"})
    assert requeued.master_port == slurm_port(42, 1) != detect(SRUN_TASK_ENV).master_port


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("node[1-2]", "node1"), ("gpu[07-09,12],cpu3", "gpu07"), ("a,b[3-4]", "a"),
    ("rack[2-3]-n[01-04]", "rack2-n01"), ("n[5,1-3]", "n5"), ("h-[008-010].ib", "h-008.ib"),
])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_tasks_per_node_expansion():
    assert tasks_per_node("8(x4)") == [8, 8, 8, 8]
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("3") == [3]


@pytest.mark.parametrize("env, message", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is not in [0, WORLD_SIZE=4)"),
    ({"RANK": "-1", "WORLD_SIZE": "4"}, "RANK=-1"),
    ({"RANK": "one", "WORLD_SIZE": "4"}, "RANK='one' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    (SRUN_TASK_ENV | {"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not in [0, SLURM_STEP_NUM_TASKS=2)"),
    (SRUN_TASK_ENV | {"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
    (SRUN_TASK_ENV | {"SLURM_LOCALID": "1"}, "SLURM_LOCALID=1 is not in [0, SLURM_NTASKS_PER_NODE=1)"),
    ({k: v for k, v in SRUN_TASK_ENV.items() if k != "SLURM_NTASKS_PER_NODE"} | {"SLURM_STEP_TASKS_PER_NODE": "8x2"},
     "SLURM_TASKS_PER_NODE='8x2'"),
    ({k: v for k, v in SRUN_TASK_ENV.items() if "NODELIST" not in k}, "SLURM_JOB_NODELIST is not set"),
])
def test_bad_environment_is_one_line_naming_the_variable(env, message):
    with pytest.raises(ValueError) as err:
        detect(env)
    assert message in str(err.value) and "\n" not in str(err.value)


# srun --ntasks-per-node=8 --gpus-per-task=1: task 3 of node 0 sees one GPU (SLURM sets CUDA_VISIBLE_DEVICES per task).
EIGHT_PER_NODE = SRUN_TASK_ENV | {"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NODEID": "0", "SLURM_NTASKS": "16",
                                  "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
                                  "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_TASKS_PER_NODE": "8(x2)"}


def test_one_gpu_per_task_uses_and_exports_cuda0_whatever_the_local_id():
    state = detect(EIGHT_PER_NODE)
    assert state.local_rank == 3 and state.local_world_size == 8
    device = gpu_binding.cuda_index(state.local_rank, count=1, local_world_size=8)
    env = distributed.exports(state, device)
    # DeepSpeed calls torch.cuda.set_device(LOCAL_RANK): it must be the visible index, or "invalid device ordinal"
    assert device == 0 and env["LOCAL_RANK"] == "0" and env["RANK"] == "3" and env["LOCAL_WORLD_SIZE"] == "8"
    assert distributed.exports(state, None)["LOCAL_RANK"] == "3"  # on CPU nothing is remapped


def test_all_gpus_visible_to_every_task_maps_local_rank_to_its_index():
    state = detect(EIGHT_PER_NODE)
    assert gpu_binding.cuda_index(state.local_rank, count=8, local_world_size=8) == 3
    assert distributed.exports(state, 3)["LOCAL_RANK"] == "3"


def test_more_local_ranks_than_visible_gpus_is_one_line(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ValueError) as err:
        gpu_binding.cuda_index(5, count=4, local_world_size=8)
    msg = str(err.value)
    assert "\n" not in msg and "LOCAL_RANK=5" in msg and "only 4 CUDA devices" in msg and "0,1,2,3" in msg
    assert "--gpus-per-task=1" in msg
    with pytest.raises(ValueError, match="no CUDA device"):
        gpu_binding.cuda_index(0, count=0)


def test_two_ranks_of_one_node_on_the_same_gpu_are_named():
    assert gpu_binding.gpu_collisions([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a"), ("n2", "GPU-b")]) is None
    msg = gpu_binding.gpu_collisions([("n1", "GPU-a"), ("n1", "GPU-b"), ("n1", "GPU-a")])
    assert msg is not None and "\n" not in msg
    assert "ranks 0 and 2 on n1 both use GPU GPU-a" in msg and "--gpus-per-task=1" in msg


def test_gpu_check_uses_only_the_rendezvous_store():
    """Issue 25, item 8: the duplicate-GPU check needs no process group (it used to open a gloo group, whose
    connections between nodes can wait 30 minutes where a hostname resolves to an unrouted address): two ranks
    that reached the rendezvous store, and no group, agree on it. Threads stand in for the ranks of one node."""
    import threading

    import torch.distributed as torch_dist

    port = free_port()
    stores = [torch_dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, wait_for_workers=False)
              for rank in range(2)]

    def check(uuids: list[str]) -> list[str | None]:
        prefix = f"run-{'-'.join(uuids)}"
        errors: list[str | None] = [None, None]

        def rank_main(rank: int) -> None:
            state = distributed.DistState(rank, rank, 2, 2, 0, "127.0.0.1", port, "torchrun")
            try:
                gpu_binding.check_distinct_gpus(state, torch_dist.PrefixStore(prefix, stores[rank]), uuids[rank],
                                                 host="n1")
            except ValueError as err:
                errors[rank] = str(err)

        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
        return errors

    assert not torch_dist.is_initialized()
    assert check(["GPU-a", "GPU-b"]) == [None, None]
    shared = check(["GPU-a", "GPU-a"])  # both ranks refuse, with one line naming both
    assert shared[0] == shared[1] and "ranks 0 and 1 on n1 both use GPU GPU-a" in shared[0] and "\n" not in shared[0]


def test_fsdp_offload_on_cuda_joins_a_group_that_reduces_host_tensors():
    """Issue 25, item 1: NCCL refuses the host tensors FSDP2's CPU offload reduces (gradient norm, gathers of the
    trainable weights). No NCCL group can be made without a GPU; the backend string each run asks for is shown
    here, and tests/test_gpu_paths.py runs the offloaded engine on CUDA."""
    from mona_dist.config.schema import EngineConfig
    from mona_dist.train.setup import host_collectives

    offload = host_collectives(EngineConfig(name="fsdp", offload_params=True))
    assert distributed.process_group_backend(cuda=True, cpu_collectives=offload) == "cuda:nccl,cpu:gloo"
    for engine in (EngineConfig(name="fsdp"), EngineConfig(name="deepspeed", zero_stage=3, offload_params=True),
                   EngineConfig(name="ddp")):
        assert distributed.process_group_backend(cuda=True, cpu_collectives=host_collectives(engine)) == "nccl"
    assert distributed.process_group_backend(cuda=False, cpu_collectives=offload) == "gloo"


def test_cpu_accelerator_hides_the_gpus_the_deepspeed_launcher_exposes():
    # `deepspeed --num_gpus 2` sets CUDA_VISIBLE_DEVICES=0,1 for its ranks even with DS_ACCELERATOR=cpu
    env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert gpu_binding.hide_cuda_under_cpu_accelerator(env) and env["CUDA_VISIBLE_DEVICES"] == ""
    assert not gpu_binding.hide_cuda_under_cpu_accelerator(env)  # already hidden
    gpu_run = {"DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert not gpu_binding.hide_cuda_under_cpu_accelerator(gpu_run) and gpu_run["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert not gpu_binding.hide_cuda_under_cpu_accelerator({"CUDA_VISIBLE_DEVICES": "0"})


def test_the_cpu_suite_sees_no_cuda_and_neither_do_its_subprocesses():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"


@pytest.mark.gpu
def test_gpu_run_sets_the_device_it_exports(clean_rank_env):
    import torch

    state = distributed.init_distributed()
    assert torch.cuda.current_device() == int(os.environ["LOCAL_RANK"]) == state.local_rank == 0


GPU_WORKER = r"""
from mona_dist import distributed as d
try:
    d.init_distributed(timeout_s=60)
    print("JOINED", flush=True)
except ValueError as err:
    print("REFUSED " + str(err), flush=True)
"""


@pytest.mark.gpu
def test_two_ranks_on_one_gpu_are_refused_before_nccl_starts():
    """Issue 25, item 8, on the GPU machine: two ranks of one node that see the same single GPU both refuse in
    one line, from the rendezvous store, before NCCL is started (bound to the GPU with device_id)."""
    base = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith("SLURM_")}
    port, procs = free_port(), []
    for rank in range(2):
        env = base | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "0"}
        procs.append(subprocess.Popen([sys.executable, "-c", GPU_WORKER], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    for out in outs:
        line = next((x for x in out.splitlines() if x.startswith(("REFUSED", "JOINED"))), out[-2000:])
        assert line.startswith("REFUSED ranks 0 and 1 on ") and "--gpus-per-task=1" in line, out[-2000:]


@pytest.fixture
def clean_rank_env(monkeypatch):
    """No launcher variables; whatever init_distributed exports is undone afterwards."""
    for name in [*RANK_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.delenv(name, raising=False)
    distributed.shutdown()
    yield
    distributed.shutdown()


def test_init_single_process_exports_env_and_helpers_are_identities(clean_rank_env):
    assert distributed.get_state().launcher == "single"
    state = distributed.init_distributed()
    assert state.launcher == "single" and distributed.init_distributed() is state  # cached
    assert {k: os.environ[k] for k in RANK_VARS} == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                                     "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                                     "MASTER_PORT": "29500"}
    # Exported RANK must not change what the rest of the run sees.
    assert distributed.get_state() is state
    import torch.distributed as torch_dist

    assert not torch_dist.is_initialized()  # world size 1: no process group needed
    distributed.barrier()
    assert distributed.all_reduce_max(3.5) == 3.5
    assert distributed.gather_object({"a": 1}) == [{"a": 1}]
    distributed.shutdown()
    assert not any(k in os.environ for k in RANK_VARS)  # exports undone: a later detect() sees the original env
    assert distributed.get_state().launcher == "single"


# Runs in each of two processes that see nothing but SLURM-style variables.
WORKER = r"""
import json, os, sys, torch
from mona_dist import distributed as d
state = d.init_distributed(timeout_s=120)
import torch.distributed as td
t = torch.tensor([float(state.rank + 1)])
td.all_reduce(t)
out = {
    "state": state.__dict__, "sum": t.item(), "pg_world": td.get_world_size(), "pg_rank": td.get_rank(),
    "backend": td.get_backend(), "max_int": d.all_reduce_max(10 * state.rank),
    "max_float": d.all_reduce_max(0.5 + state.rank),
    "max_tensor": d.all_reduce_max(torch.tensor([state.rank, -state.rank])).tolist(),
    "gathered": d.gather_object({"rank": state.rank}),
    "env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
}
d.barrier()
d.shutdown()
print("RESULT " + json.dumps(out), flush=True)
"""


def _free_slurm_job_id() -> int:
    """A fake SLURM job id whose derived rendezvous port is free right now."""
    for job_id in range(os.getpid() % 10000, 10**6, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(job_id)))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port")


@pytest.mark.slow
def test_two_processes_join_one_gloo_group_from_slurm_variables_only():
    base = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith("SLURM_")}
    job = str(_free_slurm_job_id())
    procs = []
    for rank in range(2):
        env = base | SRUN_TASK_ENV | {"SLURM_JOB_ID": job, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank),
                                      "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
                                      "SLURM_STEP_NODELIST": "localhost"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for rank, res in enumerate(results):
        assert res["state"]["launcher"] == "slurm" and res["state"]["rank"] == rank
        assert res["state"]["node_rank"] == rank and res["state"]["master_port"] == slurm_port(int(job))
        assert (res["pg_world"], res["pg_rank"], res["backend"]) == (2, rank, "gloo")
        assert res["sum"] == 3.0  # 1 + 2: both ranks contributed to one all_reduce
        assert (res["max_int"], res["max_float"], res["max_tensor"]) == (10, 1.5, [1, 0])
        assert res["env"] == {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
                              "MASTER_PORT": str(slurm_port(int(job)))}
    assert results[0]["gathered"] == [{"rank": 0}, {"rank": 1}] and results[1]["gathered"] is None
