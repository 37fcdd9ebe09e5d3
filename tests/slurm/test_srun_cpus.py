"""slurm/common.sh hands the job's --cpus-per-task to srun (issue 25, item 5).

Slurm 22.05 (Debian 12's, as here) no longer lets srun inherit --cpus-per-task from sbatch: a step started by plain
`srun` has one CPU per task. Where tasks are bound to their step's CPUs (task/affinity, or cgroups, with --exact,
which srun -c implies from 23.11) a rank then runs on one CPU with its loader workers. This cluster binds
(task/affinity on the machine's real CPUs) and turns --exact on through srun's SLURM_EXACT variable, as a site's
environment would.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


REPO = Path(__file__).resolve().parents[2]


def test_each_rank_is_bound_to_its_cpus_per_task(binding_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(textwrap.dedent("""\
        #!/bin/bash
        source "$MONA_DIST_ROOT/slurm/common.sh"
        mona_srun "$PYTHON" -c 'import os; print("CPUS", os.environ["SLURM_PROCID"], len(os.sched_getaffinity(0)))'
        """))
    out = tmp_path / "job.out"
    env = binding_cluster.env | {"MONA_DIST_ROOT": str(REPO), "PYTHON": sys.executable, "SLURM_EXACT": "1"}
    _, rc = binding_cluster.sbatch_wait(script, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2",
                                        f"--output={out}", env=env, timeout=120)
    text = out.read_text()
    assert rc == 0, text
    cpus = sorted(line.split()[1:] for line in text.splitlines() if line.startswith("CPUS"))
    assert cpus == [["0", "2"], ["1", "2"]], text
