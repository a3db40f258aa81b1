"""Dynamic int8 quantization for inference: the frozen base model's Linear layers hold int8 weights
(one scale per output channel) and quantize their inputs on the fly (one scale per tensor); LoRA A/B,
bottleneck adapters and the task heads stay in fp32 (they are tiny, and adapters must stay exact and
hot-swappable).

Weights are prepacked for oneDNN where this torch has it (x86 with VNNI runs its int8 GEMMs about
1.3x faster than fbgemm's at these sizes); the packed weights keep their kernel whatever
`torch.backends.quantized.engine` says later, so the process-wide setting is restored at once.

The FFN output projection stays fp32 by default: its inputs (after GELU) have a few large outlier
channels, and one int8 scale per tensor for them cost 1.4 points of SST-2 dev accuracy in our
measurement, against +0.5 with it kept in fp32 (benchmarks/quality.py; the speed-up drops from about
1.7x to 1.35x). `keep_fp32=()` quantizes every projection.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.errors import ConfigError

_SKIP = ("lora_A", "lora_B", "adapters", "adapter_heads")


KEEP_FP32 = ("output",)  # paths inside a layer: "output" is the FFN output, not attention.output


def _layer_path(name: str) -> str:
    """transformer.layers.3.attention.query.base -> attention.query"""
    parts = [p for p in name.split(".")[3:] if p != "base"]
    return ".".join(parts)


def quantizable(model: nn.Module, keep_fp32: tuple[str, ...] = ()) -> list[str]:
    """Names of the base model's nn.Linear modules inside the trunk (not adapters, not heads, not the
    layer paths in keep_fp32)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("transformer.layers.")
            and not any(part in _SKIP for part in name.split("."))
            and _layer_path(name) not in keep_fp32]


def quantize_int8(model: nn.Module, keep_fp32: tuple[str, ...] = KEEP_FP32) -> nn.Module:
    """Quantize in place and return the model (CPU only; merging adapters is refused afterwards)."""
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError("--quantize int8 is a CPU feature (dynamic int8 kernels); the model is on "
                          f"{next(model.parameters()).device}")
    names = quantizable(model, keep_fp32)
    if not names:
        raise ConfigError("no Linear layers to quantize in this model")
    for name in names:  # torch's dynamic quantization maps exact nn.Linear types
        model.get_submodule(name).__class__ = nn.Linear
    fused = _stacked_qkv(model, set(names))
    with warnings.catch_warnings():  # torch.ao eager quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig as qconfig
        from torch.ao.quantization import quantize_dynamic

        with prepack_engine():
            quantize_dynamic(model, {n: qconfig for n in names}, dtype=torch.qint8, inplace=True)
            for name, stacked in fused.items():
                holder = quantize_dynamic(nn.Sequential(stacked), {"0": qconfig}, dtype=torch.qint8)
                attention = model.get_submodule(name)
                attention.fused_qkv = (holder[0], (attention.query, attention.key, attention.value))
    model.__dict__["quantized"] = "int8"
    return model.eval()


@contextmanager
def prepack_engine():
    """Within: int8 weights are prepacked for oneDNN where this torch has it (else the current engine);
    yields the engine's name and restores the process-wide setting on exit."""
    engine = torch.backends.quantized.engine
    if "onednn" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "onednn"
    try:
        yield torch.backends.quantized.engine
    finally:
        torch.backends.quantized.engine = engine


def _stacked_qkv(model: nn.Module, names: set[str]) -> dict[str, nn.Linear]:
    """For each attention whose Q, K and V are all to be quantized: an fp32 [3D, D] Linear of the three
    stacked, to quantize alongside them. One activation quantization and one GEMM then replace three,
    with the same results: weights are quantized per output row, and the three share their input
    (so its one per-tensor scale)."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "fused_qkv") and all(f"{name}.{p}" in names for p in ("query", "key", "value")):
            parts = (m.query, m.key, m.value)
            stacked = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts))
            with torch.no_grad():
                stacked.weight.copy_(torch.cat([p.weight for p in parts]))
                stacked.bias.copy_(torch.cat([p.bias for p in parts]))
            out[name] = stacked
    return out
