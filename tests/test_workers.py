"""`make test` runs the suite on one pytest-xdist worker per core; each worker must use its share of
the cores, not all of them (tests/conftest.py)."""

import os

import pytest
import torch

from tests.conftest import CALLER_THREADS


def test_each_xdist_worker_uses_its_share_of_the_cores():
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        pytest.skip("checks the pytest-xdist workers of `make test` (pytest -n auto)")
    share = max(1, len(os.sched_getaffinity(0)) // int(workers))
    expected = int(CALLER_THREADS) if CALLER_THREADS is not None else share
    assert os.environ["OMP_NUM_THREADS"] == str(expected)      # inherited by the CLI subprocesses
    assert torch.get_num_threads() == expected
