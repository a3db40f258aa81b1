"""Dynamic int8 linear layers for inference, and Q/K/V as one int8 GEMM.

Int8Linear holds a frozen nn.Linear as int8: weights symmetric per output channel, prepacked once;
inputs quantized at each call with one scale per row (token); fp32 out. torch's dynamic kernel
quantizes its input with one scale per tensor, so each row is first divided by its own largest
magnitude (and the output rows multiplied back, the bias added after): one outlier token then no
longer coarsens every other token's steps. On a CPU without VNNI, whose inputs keep 7 bits, one scale
per tensor had moved all-MiniLM-L6-v2's sentence vectors to cosine 0.947 of fp32 on SST-2 sentences
(mean 0.973); one per row keeps them at 0.985 (mean 0.994), for three elementwise passes. Which layers
of a model become int8 is infer/quantize.py's business; this file is only the kernel.

Q, K and V read the same input, so where all three are Int8Linear, stacked_linear (kernels/gemm.py)
runs them as one: an Int8Linear over the three weights stacked, which this file builds on first use
and caches, keyed weakly by the three modules (a dropped model frees it; replacing any of the three,
e.g. wrapping one in LoRA, means the cached one is no longer used). One activation quantization and
one GEMM then replace three, with the same results: weights are quantized per output row, and the
three share their input (so its one per-tensor scale).

torch's private `torch.ops.quantized` ops are used only here; `available()` says whether this torch
has them (quantizing is refused otherwise, with a clear error).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.kernels import machine
from lmforge.kernels.ops import private_op


def _op(name: str):
    return private_op("quantized", name)


_PREPACK, _UNPACK, _DYNAMIC = _op("linear_prepack"), _op("linear_unpack"), _op("linear_dynamic")


def available() -> bool:
    return None not in (_PREPACK, _UNPACK, _DYNAMIC) and bool(torch.backends.quantized.supported_engines)


def _reduce_range() -> bool:
    """Without VNNI, x86 int8 GEMMs multiply u8 x s8 pairs into saturating int16 sums: inputs then
    keep 7 bits (torch's reduce_range). With VNNI the sums are int32, and all 8 bits halve the
    rounding error. VNNI as oneDNN sees it: a run capped by ONEDNN_MAX_CPU_ISA (AVX2, AVX512_CORE)
    has none even on a CPU that does (machine.cpu_flags applies the cap)."""
    flags = machine.cpu_flags()
    if flags:
        return not ({"avx512_vnni", "avx_vnni"} & flags)
    # no /proc/cpuinfo flags (not Linux): torch's own check
    return not (hasattr(torch.cpu, "_is_vnni_supported") and torch.cpu._is_vnni_supported())


REDUCE_RANGE = _reduce_range()


@contextmanager
def prepack_engine():
    """Within: int8 weights are prepacked for oneDNN where this torch has it (else the current engine);
    yields the engine's name and restores the process-wide setting on exit. Packed weights keep their
    kernel whatever `torch.backends.quantized.engine` says later."""
    engine = torch.backends.quantized.engine
    if "onednn" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "onednn"
    try:
        yield torch.backends.quantized.engine
    finally:
        torch.backends.quantized.engine = engine


def _prepack(qweight: torch.Tensor):
    # no bias inside: forward adds it after scaling the rows back
    with prepack_engine():
        return _PREPACK(qweight, None)


class Int8Linear(nn.Module):
    """A frozen nn.Linear as int8: weights symmetric per output channel (prepacked once), inputs
    quantized per row at each call, fp32 out. `weight()` / `bias()` are methods, as in torch's
    dynamic quantized Linear, so adapters wrapping it can tell it is not a trainable weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()  # [out]
        with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self._set(qw, bias)

    def _set(self, qweight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = qweight.shape
        self._packed = _prepack(qweight)
        self._bias = bias

    @classmethod
    def stacked(cls, parts: tuple[Int8Linear, ...]) -> Int8Linear:
        """One Int8Linear computing cat([p(x) for p in parts], -1): the parts' int8 rows and their
        scales stacked (exactly the rows quantizing the stacked fp32 weights would give)."""
        ws, bs = zip(*(p.weight_and_bias() for p in parts))
        qweight = torch._make_per_channel_quantized_tensor(
            torch.cat([w.int_repr() for w in ws]),                   # [sum out, in] int8
            torch.cat([w.q_per_channel_scales() for w in ws]),       # [sum out]
            torch.cat([w.q_per_channel_zero_points() for w in ws]), 0)
        bias = None if any(b is None for b in bs) else torch.cat(bs)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._set(qweight, bias)
        return fused

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _UNPACK(self._packed)[0], self._bias

    def weight(self) -> torch.Tensor:
        return self.weight_and_bias()[0]

    def bias(self) -> torch.Tensor | None:
        return self.weight_and_bias()[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one scale per row: x = a * (x / a) row by row, and W (x / a) scaled back by a
        a = x.abs().amax(-1, keepdim=True).clamp(min=1e-12)          # [..., 1]
        y = _DYNAMIC(x / a, self._packed, REDUCE_RANGE)               # [..., out]
        return y.mul_(a) if self._bias is None else torch.addcmul(self._bias, y, a)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    # Copies and pickles carry the int8 weights unpacked and pack them again for the same kernel:
    # torch's own packed-params pickling repacks for whatever engine is current (fbgemm by default),
    # whose 8-bit inputs can saturate.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = _UNPACK(state["_packed"])[0]
        return state

    def __setstate__(self, state):
        state["_packed"] = _prepack(state["_packed"])
        self.__dict__.update(state)


# -- Q/K/V as one GEMM -------------------------------------------------------------------------
# first part -> (weak refs to all the parts, their stacked Int8Linear). Weak: a dropped model frees
# its entries; the stacked module holds its own copy of the weights, no reference to the parts.
_stacks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def is_int8(layers: tuple[nn.Module, ...]) -> bool:
    return all(type(m) is Int8Linear for m in layers)


def fused(layers: tuple[Int8Linear, ...]) -> Int8Linear:
    """The stacked Int8Linear of these exact modules, built once (threads may ask at once: serving)."""
    with _lock:
        entry = _stacks.get(layers[0])
        if entry is None or len(entry[0]) != len(layers) or any(r() is not m for r, m in zip(entry[0], layers)):
            entry = (tuple(weakref.ref(m) for m in layers), Int8Linear.stacked(layers))
            _stacks[layers[0]] = entry
        return entry[1]


def stacked_linear(x: torch.Tensor, layers: tuple[Int8Linear, ...]) -> torch.Tensor:
    """cat([layer(x) for layer in layers], -1) as one int8 GEMM."""
    return fused(layers)(x)
