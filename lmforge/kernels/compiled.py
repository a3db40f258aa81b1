"""Kernels lmforge compiles on first use, for the machine it runs on.

The C++ sources in csrc/ are built by torch's cpp_extension (a C++ compiler, and ninja: the system's,
or the `ninja` package's beside this Python), once per
vector ISA, torch version and source, into `<cache dir>/build/` beside the kernel choices, and loaded
once per process as torch.ops.lmforge_kernels. The ISA is what this CPU offers after any
ONEDNN_MAX_CPU_ISA cap (machine.cpu_flags), so a benchmark that hides AVX-512 from the math libraries
hides it from these kernels too, and a cached build for another CPU is never loaded. Where nothing
can be built (no compiler, no ninja, neither AVX2 nor AVX-512, a build error), `library()` is None,
`status()` says why, and every caller keeps its plain PyTorch path; a failed build is remembered in its
build directory and not retried by every process until `lmforge env --recalibrate`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from lmforge.kernels import machine

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("packed_attention.cpp", "add_norm.cpp", "rows_parallel.cpp", "rotate_store.cpp"))
# per ISA: compiler flags and ATen's vector width (at::vec::Vectorized<float>) for that ISA
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}
FAILED = "FAILED"   # in a build directory: that build failed here, and why (not retried per process)
_lock = threading.Lock()
_state: dict = {}   # "library": the ops namespace or None, "status": why, "width": vector_width()


def isa() -> str | None:
    """The vector ISA the kernels are built for here, or None (nothing worth compiling for)."""
    flags = machine.cpu_flags()
    if {"avx512f", "avx512bw"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return None


def build_name(target: str) -> str:
    digest = hashlib.sha256(torch.__version__.encode())
    for src in SOURCES:
        digest.update(src.read_bytes())
    return f"lmforge_kernels_{target}_{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _with_ninja():
    """torch's build runs `ninja` from PATH; where none is there but the `ninja` package put one beside
    this Python (a virtual environment that is not activated), that one, for the build only."""
    here = Path(sys.executable).parent
    if shutil.which("ninja") or not (here / "ninja").exists():
        yield
        return
    path = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(here), *([path] if path else [])])
    try:
        yield
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def _build():
    from lmforge.kernels.calibrate import cache_path

    target = isa()
    if target is None:
        return None, "not built: this CPU has neither AVX2 nor AVX-512"
    if not torch.backends.openmp.is_available():
        return None, "not built: this torch has no OpenMP"
    name = build_name(target)
    build_dir = cache_path().parent / "build" / name
    failed = build_dir / FAILED
    if failed.exists():   # not again in every process: a broken toolchain can take seconds to fail
        return None, f"not built (an earlier build failed; `lmforge env --recalibrate` tries again): " \
                     f"{failed.read_text(encoding='utf-8', errors='replace').strip()}"
    try:
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        log.info("compiling lmforge's CPU kernels for %s into %s (once for this CPU and torch)", target, build_dir)
        with _with_ninja():
            load(name=name, sources=[str(s) for s in SOURCES], build_directory=str(build_dir),
                 extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS[target]], extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
        ops = torch.ops.lmforge_kernels
        return ops, f"built for {target} ({ops.vector_width()} floats a vector) in {build_dir}"
    except Exception as e:   # no compiler, no ninja, a read-only cache, a build error: plain runs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        log.warning("lmforge: its compiled CPU kernels could not be built (they need a C++ compiler: %s); "
                    "plain PyTorch runs instead", first)
        try:
            failed.write_text(first + "\n", encoding="utf-8")
        except OSError:   # a read-only cache: the next process tries again
            pass
        return None, f"not built: {first}"


def forget_failures() -> None:
    """Let the next process try builds that failed before (`lmforge env --recalibrate`)."""
    from lmforge.kernels.calibrate import cache_path

    for marker in (cache_path().parent / "build").glob(f"*/{FAILED}"):
        marker.unlink(missing_ok=True)


def library():
    """torch.ops.lmforge_kernels, built or loaded on first call; None where it cannot be built."""
    if "status" not in _state:
        with _lock:
            if "status" not in _state:
                _state["library"], _state["status"] = _build()
    return _state["library"]


def vector_width() -> int:
    """Floats per vector of the built kernels (a head size must be a multiple), 0 where none are
    built; asked once (each layer's attention checks it)."""
    if "width" not in _state:
        lib = library()
        _state["width"] = lib.vector_width() if lib is not None else 0
    return _state["width"]


def status() -> str:
    """What library() found or why it is None (`lmforge env`)."""
    library()
    return _state["status"]
