import pytest


@pytest.fixture(autouse=True)
def _both_paths(both_paths):
    """Every test here runs with the kernels on and with them disabled (see tests/conftest.py)."""
    return both_paths
