"""Write one benchmark's section of BENCHMARKS.md, between markers, leaving the others alone.

Every section says where it ran, in one place (`write_section`): the command, then a machine line
(CPU model, the ISA flags that change which kernel wins, cores, threads, torch, Python), then, where
the caller passes them, the precision the measurements ran at and the kernels that were chosen.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEvery section is written by the script it names, with the exact command; "
          "rerun the command to refresh it (`make bench` runs them all).\n")

# How the flags read in a report (lmforge.kernels.machine names them as /proc/cpuinfo does).
FLAG_NAMES = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW",
              "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX512_BF16",
              "amx_tile": "AMX-TILE", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8", "avx512_fp16": "AVX512_FP16"}


def machine_info() -> dict:
    """lmforge.kernels.machine.info() of this process (its ISA flags after any ONEDNN_MAX_CPU_ISA cap)."""
    try:
        from lmforge.kernels import machine
        return machine.info()
    except ImportError:  # an older lmforge: what platform alone says
        return {"cpu": platform.processor() or platform.machine(), "flags": None, "cores": os.cpu_count(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "isa_cap": None}


def flags_text(flags) -> str:
    if flags is None:
        return "ISA flags unknown"
    shown = [FLAG_NAMES.get(f, f) for f in sorted(flags, key=lambda f: list(FLAG_NAMES).index(f)
                                                  if f in FLAG_NAMES else len(FLAG_NAMES))]
    return " ".join(shown) if shown else "none of AVX2 / AVX-512 / VNNI / BF16 / AMX"


def machine(info: dict | None = None) -> str:
    """One line: CPU model (arch; ISA flags that matter), cores, torch, threads, Python."""
    info = info or machine_info()
    cap = f", capped by ONEDNN_MAX_CPU_ISA={info['isa_cap']}" if info.get("isa_cap") else ""
    return (f"{info['cpu']} ({platform.machine()}; {flags_text(info.get('flags'))}{cap}), "
            f"{info['cores']} CPU cores, torch {info['torch']}, {info['threads']} threads, "
            f"Python {sys.version.split()[0]}")


def kernel_summary(used: dict) -> str:
    """{'op|dtype|mode|shape|bucket': kernel or {"kernel": ...}} -> 'linear fp32 train: onednn 9, plain 3; ...'
    (counts of weight shape x row-size bucket choices per op, compute dtype and mode)."""
    groups: dict[str, Counter] = {}
    for key, value in sorted(used.items()):
        parts = key.split("|")
        if len(parts) < 5:
            continue
        op, dtype, mode = parts[:3]
        kernel = value.get("kernel") if isinstance(value, dict) else value
        groups.setdefault(f"{op} {dtype.replace('float32', 'fp32').replace('bfloat16', 'bf16')} {mode}",
                          Counter())[kernel] += 1
    return "; ".join(f"{g}: " + ", ".join(f"{k} {n}" for k, n in sorted(c.items())) for g, c in groups.items()) \
        or "none recorded"


def cached_kernels() -> str:
    """The kernel choices this machine's cache holds (what lmforge subprocesses read), summarised;
    or what LMFORGE_KERNELS forces."""
    try:
        from lmforge.kernels.calibrate import CHOICES, cache_path, forced
        if forced():
            return f"forced by LMFORGE_KERNELS={os.environ.get('LMFORGE_KERNELS')}"
        return f"{kernel_summary(CHOICES.table())} (cache {cache_path()})"
    except Exception as e:  # the report must not fail over a summary line
        return f"not recorded ({type(e).__name__})"


def trainer_precision(name: str = "auto") -> str:
    """What `lmforge finetune --precision NAME` computes in on this machine's CPU, read from the
    trainer's own autocast choice (not assumed from the hardware)."""
    try:
        from lmforge.train.trainer import autocast_context
        ctx = autocast_context(torch.device("cpu"), name)
        resolved = "bf16 (autocast)" if isinstance(ctx, torch.autocast) else "fp32"
    except Exception as e:
        resolved = f"unknown ({type(e).__name__})"
    return f"`--precision {name}` (the default), which the trainer runs in {resolved} on this CPU"


def write_section(name: str, command: str, body: str, precision: str | None = None,
                  kernels: str | None = None, info: dict | None = None) -> None:
    """Replace (or append) section `name`. `precision` and `kernels`: one line each for the machine
    block, where the benchmark has them; `info`: machine.info() if not this process's."""
    text = BENCHMARKS.read_text() if BENCHMARKS.is_file() else HEADER
    where = f"Measured {time.strftime('%Y-%m-%d')} on {machine(info)}."
    if precision:
        where += f"  \nPrecision: {precision}."
    if kernels:
        where += f"  \nKernels: {kernels}."
    block = (f"<!-- bench:{name} -->\n## {name}\n\nCommand: `{command}`  \n"
             f"{where}\n\n{body.rstrip()}\n<!-- /bench:{name} -->\n")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    tmp = BENCHMARKS.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS)
