"""The local SLURM cluster really schedules across two nodes, and mona_dist.distributed forms a group from srun."""

from __future__ import annotations

import json
import textwrap

import pytest

from mona_dist.distributed import first_host, slurm_port

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_cluster_has_two_idle_nodes(slurm_cluster):
    assert slurm_cluster.node_states() == {"node1": "idle", "node2": "idle"}
    out = slurm_cluster.run("sinfo", "--noheader", "--format=%P %D %a").stdout.split()
    assert out == ["debug*", "2", "up"]


@pytest.mark.parametrize("nodelist", ["node[1-2]", "node2,node1", "node[2,1]"])
def test_first_host_agrees_with_scontrol(slurm_cluster, nodelist):
    hosts = slurm_cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()
    assert first_host(nodelist) == hosts[0]


# Each task: join the group through init_distributed (SLURM variables only), all_reduce, report where it ran.
TASK = textwrap.dedent("""
    import json, os, torch
    import torch.distributed as td
    from mona_dist.distributed import init_distributed
    s = init_distributed(timeout_s=120)
    t = torch.tensor([float(s.rank + 1)])
    td.all_reduce(t)
    print("RESULT " + json.dumps({"rank": s.rank, "world": td.get_world_size(), "launcher": s.launcher,
          "sum": t.item(), "node_rank": s.node_rank, "nodeid": os.environ["SLURM_NODEID"],
          "node": os.environ["SLURMD_NODENAME"], "master": [s.master_addr, s.master_port],
          "backend": td.get_backend()}), flush=True)
    td.destroy_process_group()
""")


def test_two_node_job_forms_one_gloo_group(slurm_cluster, job_env, tmp_path):
    (tmp_path / "task.py").write_text(TASK)
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nsrun {job_env['MONA_DIST_ROOT']}/.venv/bin/python {tmp_path}/task.py\n")
    out = tmp_path / "job.out"
    job_id, rc = slurm_cluster.sbatch_wait(
        script, "--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=0", f"--output={out}",
        f"--chdir={job_env['MONA_DIST_ROOT']}", env=job_env)
    log = out.read_text()
    assert rc == 0, log
    results = sorted((json.loads(line[7:]) for line in log.splitlines() if line.startswith("RESULT ")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], log
    for r in results:
        assert (r["world"], r["launcher"], r["backend"], r["sum"]) == (2, "slurm", "gloo", 3.0)
        assert r["master"] == ["node1", slurm_port(job_id)]
    assert [(r["node"], r["nodeid"], r["node_rank"]) for r in results] == [("node1", "0", 0), ("node2", "1", 1)]
