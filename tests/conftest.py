"""Shared pytest configuration. Topic fixtures live in tests/fixtures_*.py and are registered here."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

pytest_plugins = ["fixtures_aiida", "fixtures_workflows", "fixtures_al"]
