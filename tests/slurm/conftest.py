"""Session fixture: one real local Slurm cluster (two fake nodes n1/n2 on this host, each 64 CPUs
and 8 fake GPUs, so the scripts' unedited #SBATCH headers fit).

A job confined to one node of it is a single-node job (glance.sbatch runs that way); twinflow.sbatch spans both.
One cluster serves every test, so the daemons start once (~1 s) and the slow trainer jobs can run concurrently.
"""
import pytest

from cluster import LocalSlurm, why_unavailable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm-cluster"), nodes=("n1", "n2"), cpus_per_node=64,
                         gpus_per_node=8)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
