"""lmforge bounds oneDNN's and ideep's per-shape caches on import (kernels/caches.py), before any
primitive exists, and keeps a value the user set. (Without the bound a server's RSS grew by 1 GB
under bf16 with varied batch shapes: benchmarks/soak.py measures it.)"""

import os
import subprocess
import sys

import pytest

from lmforge.kernels import caches

SHOW = ("import os, lmforge; "
        "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])")


def _run(extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in caches.VARIABLES}
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("extra, expected", [
    ({}, [str(caches.CAPACITY), str(caches.CAPACITY)]),
    ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"}, ["7", str(caches.CAPACITY)]),
    ({"LRU_CACHE_CAPACITY": "0"}, [str(caches.CAPACITY), "0"]),
])
def test_importing_lmforge_bounds_the_caches(extra, expected):
    assert _run(extra) == expected


def test_bound_is_small():
    assert 16 <= caches.CAPACITY <= 256   # the defaults (1,024 each) are what grew the server's RSS
