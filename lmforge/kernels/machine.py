"""What machine this is: the facts a kernel choice depends on (CPU model, ISA flags, threads, torch).

The calibration cache (kernels/calibrate.py) is keyed by `machine_key()`, so a choice measured on
one CPU is never reused on another, nor after a torch upgrade or a change of thread count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform

import torch

# The ISA extensions that change which kernel wins: fp32 GEMM width (AVX2 / AVX-512), int8 dot
# products (VNNI), bf16 (AVX512_BF16, AMX). Names as /proc/cpuinfo spells them.
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                     "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16")

# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA; benchmarks hide instructions with them). oneDNN defines each
# cap as a set of feature bits (dnnl_cpu_isa_t), and they do not nest as names suggest: AVX512_CORE
# (0x27) lacks AVX2_VNNI's bit (0x8), which comes back only with AVX10_1_512 / AVX512_CORE_FP16 (0x1ef).
# So the table is of oneDNN's bits, each with the /proc/cpuinfo flags it stands for.
_BIT_FLAGS = {
    "avx2": {"avx2", "fma"},
    "avx2_vnni": {"avx_vnni"},
    "avx512_core": {"avx512f", "avx512bw"},
    "avx512_core_vnni": {"avx512_vnni"},
    "avx512_core_bf16": {"avx512_bf16"},
    "fp16": {"avx512_fp16"},
    "amx": {"amx_tile", "amx_int8", "amx_bf16"},
}
_AVX512_CORE = ("avx2", "avx512_core")
_AVX10_1_512 = (*_AVX512_CORE, "avx512_core_vnni", "avx512_core_bf16", "avx2_vnni", "fp16")
_CAP_BITS = {
    "SSE41": (), "AVX": (),
    "AVX2": ("avx2",),
    "AVX2_VNNI": ("avx2", "avx2_vnni"),
    "AVX2_VNNI_2": ("avx2", "avx2_vnni"),                      # + int8/bf16/fp16 converts (no flag here)
    "AVX512_CORE": _AVX512_CORE,
    "AVX512_CORE_VNNI": (*_AVX512_CORE, "avx512_core_vnni"),
    "AVX512_CORE_BF16": (*_AVX512_CORE, "avx512_core_vnni", "avx512_core_bf16"),
    "AVX10_1_512": _AVX10_1_512, "AVX512_CORE_FP16": _AVX10_1_512,
    "AVX10_1_512_AMX": (*_AVX10_1_512, "amx"), "AVX512_CORE_AMX": (*_AVX10_1_512, "amx"),
    "AVX10_1_512_AMX_FP16": (*_AVX10_1_512, "amx"), "AVX512_CORE_AMX_FP16": (*_AVX10_1_512, "amx"),
    "AVX10_2_512": _AVX10_1_512,                               # oneDNN 3.7+
    "AVX10_2_512_AMX_2": (*_AVX10_1_512, "amx"),
}
# flags each cap hides; DEFAULT, unset or a value oneDNN does not know hide nothing
_ISA_CAPS = {cap: set(FLAGS_THAT_MATTER) - {f for b in bits for f in _BIT_FLAGS[b]} for cap, bits in _CAP_BITS.items()}


def isa_cap() -> str | None:
    """The oneDNN ISA cap in force (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA), upper case."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap and cap.strip() else None


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the model name from platform, no flags (kernels fall back to measuring)
        pass
    return model, frozenset(flags)


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The ISA flags that matter, less those hidden from the math libraries by ONEDNN_MAX_CPU_ISA
    (so a run that caps oneDNN at AVX2 reports, and chooses, as an AVX2 machine would)."""
    flags = {f for f in _cpuinfo()[1] if f in FLAGS_THAT_MATTER}
    return frozenset(flags - _ISA_CAPS.get(isa_cap() or "", set()))


def has_bf16() -> bool:
    """bf16 matrix multiply in hardware: AMX tiles or AVX-512 BF16 dot products."""
    f = cpu_flags()
    return "amx_bf16" in f or "avx512_bf16" in f


def has_amx() -> bool:
    return "amx_bf16" in cpu_flags()


def info() -> dict:
    """The machine as `lmforge env` prints it and benchmarks record it."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "flags": sorted(cpu_flags()),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onednn": torch.backends.mkldnn.is_available(),
        "isa_cap": isa_cap(),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_bf16": bool(cuda and torch.cuda.is_bf16_supported()),
    }


def machine_key() -> str:
    """A short hash of what a kernel choice depends on."""
    facts = {k: info()[k] for k in ("cpu", "flags", "threads", "torch", "onednn", "isa_cap")}
    facts["mkl_isa"] = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
