"""`slurm_cluster`: one real two-node SLURM cluster (tests/slurm/cluster.py) for the whole session, always stopped."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# Loaded under a unique name: test folders here have no __init__.py, so a bare `import cluster` could pick up
# another folder's module of the same name.
_spec = importlib.util.spec_from_file_location("mona_test_slurm_cluster", HERE / "cluster.py")
cluster_mod = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cluster_mod
_spec.loader.exec_module(cluster_mod)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A started cluster (SlurmCluster: .env has SLURM_CONF, .sbatch_wait, .run, .job_fields).

    Skips only when SLURM cannot be installed at all (no apt, no network) and not in CI (CI set), where it must run.
    Daemons are stopped by pid afterwards, whatever the tests did.
    """
    yield from started_cluster(tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="module")
def binding_cluster(tmp_path_factory):
    """A second cluster that binds each task to its step's CPUs (task/affinity on the machine's real CPUs)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell 1 from 2")
    yield from started_cluster(tmp_path_factory.mktemp("slurm-bind"), bind_cpus=True)


def started_cluster(root, **options):
    """Start a test cluster in `root` (cluster.start's options), yield it, stop it whatever the tests did; skip
    where SLURM cannot be had, fail in CI."""
    try:
        cluster = cluster_mod.start(root, **options)
    except cluster_mod.ClusterUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM test cluster unavailable in CI: {err}")
        pytest.skip(f"SLURM test cluster unavailable: {err}")
    try:
        yield cluster
    finally:
        cluster_mod.stop(root)


@pytest.fixture
def job_env(slurm_cluster):
    """Environment for sbatch: the cluster's, with this checkout as MONA_DIST_ROOT and one thread per task.

    PYTHONPATH lets job scripts outside the checkout import mona_dist even where it is not pip-installed.
    """
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return slurm_cluster.env | {"MONA_DIST_ROOT": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
