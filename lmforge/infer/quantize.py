"""Dynamic int8 quantization for inference: the frozen base model's Linear layers hold int8 weights
(one scale per output channel) and quantize their inputs on the fly (one scale per tensor); LoRA A/B,
bottleneck adapters and the task heads stay in fp32 (they are tiny, and adapters must stay exact and
hot-swappable).

Every projection of the trunk is int8 by default. Two choices keep that accurate: weight scales per
output channel (one scale per tensor lost 1.1 to 2.1 points of SST-2 dev accuracy on three fine-tuned
models with the FFN output in int8), and inputs in all 8 bits where the CPU has VNNI (torch's dynamic
Linear keeps 7): the post-GELU inputs of the FFN output have outlier channels, about 14x the median.
`benchmarks/int8.py` measures the cost over every fine-tuned SST-2 model. `keep_fp32=("output",)`
keeps the FFN output in fp32.

Weights are prepacked for oneDNN where this torch has it (on this VNNI machine its dynamic int8 GEMMs
beat fbgemm's at these sizes); packed weights keep their kernel whatever
`torch.backends.quantized.engine` says later, so the process-wide setting is restored at once.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.errors import ConfigError

_SKIP = ("lora_A", "lora_B", "adapters", "adapter_heads")


# Layer paths left fp32 unless asked: ("output",) would be the FFN output (not attention.output).
KEEP_FP32: tuple[str, ...] = ()


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
    fused = _stacked_qkv(model, set(names))
    with prepack_engine():
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int8Linear(model.get_submodule(name)))
        for name, stacked in fused.items():
            attention = model.get_submodule(name)
            attention.fused_qkv = (Int8Linear(stacked), (attention.query, attention.key, attention.value))
    model.__dict__["quantized"] = "int8"
    return model.eval()


# Without VNNI, x86 int8 GEMMs multiply u8 x s8 pairs into saturating int16 sums: inputs then keep
# 7 bits (torch's reduce_range). With VNNI the sums are int32, and all 8 bits halve the rounding error.
_REDUCE_RANGE = not (hasattr(torch.cpu, "_is_vnni_supported") and torch.cpu._is_vnni_supported())


class Int8Linear(nn.Module):
    """A frozen nn.Linear as int8: weights symmetric per output channel (prepacked once), inputs
    quantized per tensor at each call, fp32 out. `weight()` / `bias()` are methods, as in torch's
    dynamic quantized Linear, so adapters wrapping it can tell it is not a trainable weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()  # [out]
        with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self._packed = torch.ops.quantized.linear_prepack(qw, bias)

    def weight(self) -> torch.Tensor:
        return torch.ops.quantized.linear_unpack(self._packed)[0]

    def bias(self) -> torch.Tensor | None:
        return torch.ops.quantized.linear_unpack(self._packed)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, _REDUCE_RANGE)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    # Copies and pickles carry the int8 weights unpacked and pack them again for the same kernel:
    # torch's own packed-params pickling repacks for whatever engine is current (fbgemm by default),
    # whose 8-bit inputs can saturate.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = torch.ops.quantized.linear_unpack(state["_packed"])
        return state

    def __setstate__(self, state):
        weight, bias = state["_packed"]
        with prepack_engine():
            state["_packed"] = torch.ops.quantized.linear_prepack(weight, bias)
        self.__dict__.update(state)


QUANTIZE_CHOICES = ("int8",)


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """`--quantize KIND` of `lmforge evaluate / predict / embed` (Classifier, Embedder)."""
    if kind != "int8":
        raise ConfigError(f"--quantize: unknown kind {kind!r} (expected one of {', '.join(QUANTIZE_CHOICES)})")
    return quantize_int8(model)


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
