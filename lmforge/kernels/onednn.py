"""oneDNN GEMMs on a weight reordered once into its blocked layout (CPU, fp32 and bf16).

torch's private `torch.ops.mkldnn` ops are used only here, each looked up once and guarded: a torch
build without them makes `available()` False and every caller falls back to plain PyTorch.

Why: F.linear re-reads the weight in its plain layout every call, and under bf16 autocast it also
casts the fp32 weight to bf16 every call. Reordering (and casting) once per weight version and
reusing the result is what makes these fast: on a 2-core AMX Xeon, bf16 GEMMs of MiniLM's shapes run
at 1.9-3.0 TFLOP/s this way against 0.9-1.6 through autocast's F.linear, and fp32 a few percent to
2x faster than F.linear depending on the CPU (kernels/calibrate.py measures which, per machine).

Packed weights are cached per weight tensor (weakly: a dropped model frees them) and rebuilt when
the tensor's version counter or storage changes, so an optimizer step, a LoRA merge or a checkpoint
load all invalidate them.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lmforge.kernels.ops import private_op


def _op(name: str):
    return private_op("mkldnn", name)


_LINEAR = _op("_linear_pointwise")
_REORDER = _op("_reorder_linear_weight")
_BINARY = getattr(_LINEAR, "binary", None) if _LINEAR is not None else None

DTYPES = (torch.float32, torch.bfloat16)
# oneDNN post-op (name, algorithm) for each activation the models use.
POST_OPS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
            "relu": ("relu", "")}


@functools.cache
def available() -> bool:
    # asked on every GEMM: answered once (the build and the CPU do not change within a process)
    return torch.backends.mkldnn.is_available() and _LINEAR is not None and _REORDER is not None


@functools.cache
def _bf16_native() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def supports(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Can this input run here, computing in `dtype`?"""
    return (available() and x.device.type == "cpu" and dtype in DTYPES and x.numel() > 0
            and (dtype == torch.float32 or _bf16_native()))


# -- packed weights ----------------------------------------------------------------------------
_packs: WeakIdKeyDictionary = WeakIdKeyDictionary()   # first weight -> {slot: (key, packed, bias)}


def _version(t: torch.Tensor | None) -> tuple:
    if t is None:
        return (None,)
    # inference tensors have no version counter; they cannot be changed outside inference_mode
    return (t.data_ptr(), None if t.is_inference() else t._version)


def packed_weight(weights: tuple[torch.Tensor, ...], biases: tuple, dtype: torch.dtype,
                  transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W reordered for oneDNN, bias), W = the weights stacked along the output dimension (one
    weight for a plain linear, Q, K, V for a stacked projection), cast to dtype, optionally
    transposed (for the input gradient). Cached until any weight or bias changes."""
    key = tuple(_version(w) for w in weights) + tuple(_version(b) for b in biases)
    slots = _packs.setdefault(weights[0], {})
    slot = (len(weights), dtype, transposed)
    cached = slots.get(slot)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            w = weights[0].detach() if len(weights) == 1 else torch.cat([t.detach() for t in weights])
            w = w.to(dtype)
            packed = _REORDER(w.t() if transposed else w)   # the reorder reads the strided view
            bias = None
            if all(b is not None for b in biases) and biases:
                bias = (biases[0].detach() if len(biases) == 1 else torch.cat([b.detach() for b in biases])).to(dtype)
        cached = (key, packed, bias)
        slots[slot] = cached
    return cached[1], cached[2]


# -- row buckets ---------------------------------------------------------------------------------
# oneDNN (and torch's ideep layer above it) builds and caches a primitive, with its buffers, for every
# new row count: packed batches have a different number of tokens each time, and a server's memory
# grew by about 1.5 GB over 1,200 distinct counts (benchmarks/soak.py found it). Rows are padded with
# zeros up to one of 8 sizes per octave (at most 12.5% more rows, about 5% on average), so a process
# meets a few dozen shapes and its memory levels off; the caches then hit instead of compiling.
EXACT_ROWS = 32          # up to this many rows: no padding (few shapes; batch-1 latency untouched)
STEPS_PER_OCTAVE = 8


def bucket_rows(m: int) -> int:
    if m <= EXACT_ROWS:
        return m
    step = (1 << (m.bit_length() - 1)) // STEPS_PER_OCTAVE   # 2^floor(log2 m) / 8
    return -(-m // step) * step


def _pad_rows(t: torch.Tensor, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t [m, k] (any strides) -> [rows, k] contiguous in dtype (t's own by default), zeros below: the
    cast to the compute dtype and the padding are one pass (each was a copy of every GEMM input in
    bf16 inference). Only the tail is zeroed: a full zero fill first was a twelfth of a bf16
    inference pass on an AMX Xeon."""
    m, dtype = t.shape[0], dtype or t.dtype
    if m == rows:
        return t.to(dtype).contiguous()
    if dtype == t.dtype and _padded_already(t, rows):
        # t is the first m rows of an earlier GEMM's padded output (gemm returns that view): its
        # buffer's first `rows` rows are the padded input, no copy. The rows past m hold whatever that
        # GEMM computed for its own padding; rows are independent in a GEMM and its post-ops, so they
        # reach only the rows past m of this output, which are cut off too.
        return t.as_strided((rows, t.shape[1]), (t.shape[1], 1))
    out = t.new_empty(rows, t.shape[1], dtype=dtype)
    out[:m] = t
    out[m:] = 0
    return out


def _padded_already(t: torch.Tensor, rows: int) -> bool:
    """t [m, k] is contiguous and its storage holds `rows` full rows from where t starts."""
    return (t.is_contiguous() and not t.requires_grad
            and (t.storage_offset() + rows * t.shape[1]) * t.element_size() <= t.untyped_storage().nbytes())


def gemm(x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, act: str | None = None,
         dtype: torch.dtype | None = None, rows_parallel: int = 0) -> torch.Tensor:
    """x2d [m, k] W^T + b (then act), x2d cast to dtype (the packed weight's) on the way in.
    rows_parallel > 1: the rows split into that many parts, one single-threaded oneDNN call each, in
    parallel (the compiled kernel csrc/rows_parallel.cpp; the caller checked it is built)."""
    name, algo = POST_OPS[act] if act else ("none", "")
    m = x2d.shape[0]
    x = _pad_rows(x2d, bucket_rows(m), dtype)
    if rows_parallel > 1:
        from lmforge.kernels import compiled
        # packed keeps W's logical shape [out, in] whatever its blocked layout
        return compiled.library().rows_parallel_linear(x, packed, bias, packed.shape[0], name, algo, rows_parallel)[:m]
    return _LINEAR(x, packed, bias, name, [], algo)[:m]


def gemm_add(x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """x W^T + b + other as one GEMM with a binary post-op."""
    m = x2d.shape[0]
    rows = bucket_rows(m)
    return _BINARY(_pad_rows(x2d, rows), _pad_rows(other, rows), packed, bias, "add")[:m]


def weight_grad(gy: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """gy^T x [out, in] as a oneDNN linear whose 'weight' is the narrower of x^T and gy^T, reordered
    on the fly (faster than torch.mm on the CPUs measured, reorder included). The rows (tokens) are
    the reduction here: zero rows padded to a bucket add nothing."""
    rows = bucket_rows(x2d.shape[0])
    gy, x2d = _pad_rows(gy, rows), _pad_rows(x2d, rows)
    if x2d.shape[1] <= gy.shape[1]:   # in <= out: pack x^T [in, N]
        return gemm(gy.t().contiguous(), _REORDER(x2d.t()), None)
    # contiguous: optimizers' fused kernels read gradients as flat buffers with the parameter's strides
    return gemm(x2d.t().contiguous(), _REORDER(gy.t()), None).t().contiguous()


class LinearFn(torch.autograd.Function):
    """y = x W^T + b through packed weights; backward packs W^T for the input gradient. x2d is
    already in the compute dtype; W and b may be fp32 master weights (their gradients are cast
    back to their dtype)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias):
        packed, b = packed_weight((weight,), (bias,), x2d.dtype)
        ctx.save_for_backward(x2d if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return gemm(x2d, packed, b)

    @staticmethod
    def backward(ctx, gy):
        x2d, weight = ctx.saved_tensors
        gy = gy.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gemm(gy, packed_weight((weight,), (), gy.dtype, transposed=True)[0], None)
        if ctx.needs_input_grad[1]:
            gw = weight_grad(gy, x2d).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0, dtype=torch.float32).to(weight.dtype)
        return gx, gw, gb


class LowRankStackedFn(torch.autograd.Function):
    """y = x [W_1; ...; W_k]^T + b, then scale * h B^T added to listed column spans of y. The W are
    frozen: backward gives x one GEMM over the stacked weights, and each (h, B) its thin GEMMs."""

    @staticmethod
    def forward(ctx, x2d, weights, biases, spans, *terms):
        packed, b = packed_weight(weights, biases, x2d.dtype)
        y = gemm(x2d, packed, b)
        for (lo, hi, scale), (h, B) in zip(spans, zip(terms[0::2], terms[1::2])):
            y[:, lo:hi].addmm_(h.to(y.dtype), B.t().to(y.dtype), alpha=scale)
        ctx.weights, ctx.spans = weights, spans
        ctx.save_for_backward(*terms)
        return y

    @staticmethod
    def backward(ctx, gy):
        gy = gy.contiguous()
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gemm(gy, packed_weight(ctx.weights, (), gy.dtype, transposed=True)[0], None)
        grads = []
        terms = ctx.saved_tensors
        for i, (lo, hi, scale) in enumerate(ctx.spans):
            h, B = terms[2 * i], terms[2 * i + 1]
            g = gy[:, lo:hi]                                   # [N, out_i], strided
            gh = torch.mm(g, B.to(g.dtype)).mul_(scale).to(h.dtype) if ctx.needs_input_grad[4 + 2 * i] else None
            gB = torch.mm(g.t(), h.to(g.dtype)).mul_(scale).to(B.dtype) if ctx.needs_input_grad[5 + 2 * i] else None
            grads += [gh, gB]
        return (gx, None, None, None, *grads)
