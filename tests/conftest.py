"""Shared pytest configuration. Topic fixtures live in tests/fixtures_*.py and are registered here."""
import os
import shutil

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

pytest_plugins = ["fixtures_aiida", "fixtures_workflows", "fixtures_al"]


def pytest_runtest_setup(item):
    """`slurm` tests need a SLURM cluster: skipped, saying so, on a machine without one. Where `sinfo` exists a
    cluster is meant to answer, so a controller that does not is a failure, not a skip."""
    if item.get_closest_marker("slurm") is not None and shutil.which("sinfo") is None:
        pytest.skip("no SLURM scheduler on this machine (`sinfo` is not on PATH); "
                    "`bash setup_profiles/slurm_one_node.sh` starts a one-node cluster (as .ci/run does)")
