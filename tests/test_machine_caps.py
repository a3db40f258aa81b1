"""kernels.machine under oneDNN's ISA caps: on a CPU with every flag that matters, each documented
ONEDNN_MAX_CPU_ISA value leaves exactly the flags oneDNN's own cap definition (dnnl_cpu_isa_t bits)
allows, so a capped run reports, keys its kernel cache and resolves `--precision auto` as the older
CPU it imitates. The expected sets are written out here, not derived from machine.py's table."""

import pytest

from lmforge.kernels import machine

EVERY = frozenset(machine.FLAGS_THAT_MATTER)
AVX2 = {"avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw"}
AVX10_1 = AVX512 | {"avx512_vnni", "avx512_bf16", "avx_vnni", "avx512_fp16"}
AMX = {"amx_tile", "amx_int8", "amx_bf16"}

# cap -> flags still reported on a CPU that has them all
CASES = [
    ("SSE41", set()),
    ("AVX", set()),
    ("AVX2", AVX2),                                      # a laptop: no AVX-512, no VNNI, no bf16, no AMX
    ("AVX2_VNNI", AVX2 | {"avx_vnni"}),
    ("AVX2_VNNI_2", AVX2 | {"avx_vnni"}),
    ("AVX512_CORE", AVX512),                             # avx_vnni hidden: oneDNN's 0x27 lacks its bit
    ("AVX512_CORE_VNNI", AVX512 | {"avx512_vnni"}),
    ("AVX512_CORE_BF16", AVX512 | {"avx512_vnni", "avx512_bf16"}),
    ("AVX512_CORE_FP16", AVX10_1),
    ("AVX10_1_512", AVX10_1),
    ("AVX512_CORE_AMX", AVX10_1 | AMX),
    ("AVX10_1_512_AMX", AVX10_1 | AMX),
    ("AVX512_CORE_AMX_FP16", AVX10_1 | AMX),
    ("AVX10_1_512_AMX_FP16", AVX10_1 | AMX),
    ("AVX10_2_512", AVX10_1),
    ("AVX10_2_512_AMX_2", AVX10_1 | AMX),
    ("DEFAULT", EVERY),
    ("avx2", AVX2),                                      # oneDNN reads the value case-insensitively
    (None, EVERY),
]


@pytest.fixture
def every_flag(monkeypatch):
    """A CPU with every flag that matters (plus one that does not)."""
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("Test CPU", EVERY | {"sse4_2"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize("cap, visible", CASES)
def test_each_cap_hides_what_onednn_hides(every_flag, monkeypatch, cap, visible):
    if cap is not None:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert machine.cpu_flags() == visible
    assert machine.has_bf16() == bool({"avx512_bf16", "amx_bf16"} & visible)
    assert machine.has_amx() == ("amx_bf16" in visible)
    assert machine.info()["flags"] == sorted(visible)
    assert machine.info()["isa_cap"] == (cap.upper() if cap else None)


def test_avx2_hides_every_newer_instruction(every_flag, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    flags = machine.cpu_flags()
    assert not any(f.startswith(("avx512", "amx")) for f in flags) and "avx_vnni" not in flags


def test_older_variable_name_and_the_cache_key(every_flag, monkeypatch):
    """DNNL_MAX_CPU_ISA (oneDNN's older name) caps too; every distinct cap is a distinct machine key."""
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert machine.cpu_flags() == AVX512 | {"avx512_vnni"}
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    keys = set()
    for cap in ("AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_AMX"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        keys.add(machine.machine_key())
    assert len(keys) == 5


def test_precision_auto_follows_the_cap_and_says_so(every_flag, monkeypatch):
    import torch

    from lmforge.kernels.precision import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "bf16"
    for cap, name in [("AVX512_CORE_BF16", "bf16"), ("AVX512_CORE_VNNI", "fp32"), ("AVX2", "fp32")]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        p = resolve_precision("auto", cpu)
        assert p.name == name and f"under ONEDNN_MAX_CPU_ISA={cap}" in p.why, p
