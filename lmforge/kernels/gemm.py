"""Linear layers through the kernel chosen for this machine (kernels/calibrate.py).

Every function here computes exactly what its plain-PyTorch reading says (the docstring's formula),
through oneDNN's packed GEMMs where they were measured faster, else through F.linear. bf16 compute
is torch.autocast's: fp32 master weights, the GEMM in bf16 (the packed path caches the bf16 copy of
each frozen weight instead of casting it on every call, as autocast's F.linear does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels import int8, onednn
from lmforge.kernels.calibrate import CHOICES, choose


class LowRankWrapper(nn.Module, ABC):
    """The interface of an adapter wrapping a frozen Linear `base` (LoRA subclasses it):
    forward(x) = base(x) + sum of scale * h B^T. `low_rank_updates(x)` gives those
    [(h [N, r], B [out, r], scale)], or None when this call cannot be expressed that way (a
    mixed-adapter batch), so that stacked_linear can share the base GEMM with the other layers."""
    base: nn.Linear

    @abstractmethod
    def low_rank_updates(self, x: torch.Tensor) -> list[tuple] | None: ...


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype GEMMs on x compute in: autocast's where it is on, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _needs_grad(x: torch.Tensor, *params) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _kernel(op: str, x: torch.Tensor, dtype: torch.dtype, train: bool, shape) -> str:
    if not onednn.supports(x, dtype) or x.dtype not in onednn.DTYPES:
        return "plain"
    return choose(op, x.device, dtype, train, shape, _rows(x))


ROWS_PARALLEL_MIN = 128   # fewer rows: each thread's part too small for a call of its own (0.6-0.75x at 128)


def _rows_parallel(x2d: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """The threads to split this inference GEMM's rows across (where the compiled kernel was measured
    faster for this weight shape and row bucket: calibrate.py, op `rows_parallel`), else 0."""
    threads = torch.get_num_threads()
    if threads < 2 or x2d.shape[0] < ROWS_PARALLEL_MIN:
        return 0
    if choose("rows_parallel", x2d.device, dtype, False, shape, x2d.shape[0]) != "compiled":
        return 0
    from lmforge.kernels import compiled

    return threads if compiled.library() is not None else 0   # forced where nothing was built: one call


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str | None = None) -> torch.Tensor:
    """x W^T + b."""
    dtype = compute_dtype(x)
    train = _needs_grad(x, weight, bias)
    if kernel is None:
        kernel = _kernel("linear", x, dtype, train and weight.requires_grad, (weight.shape[1], weight.shape[0]))
    if kernel != "onednn" or weight.dtype not in onednn.DTYPES:
        return F.linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])                # [N, in]
    if train:
        y = onednn.LinearFn.apply(x2d.to(dtype).contiguous(), weight, bias)
    else:   # cast to the compute dtype as the GEMM pads its rows: one pass
        packed, b = onednn.packed_weight((weight,), (bias,), dtype)
        y = onednn.gemm(x2d, packed, b, dtype=dtype, rows_parallel=_rows_parallel(x2d, dtype, tuple(weight.shape[::-1])))
    return y.view(*x.shape[:-1], weight.shape[0])


def _fusable(x: torch.Tensor, layer: nn.Module) -> torch.dtype | None:
    """The compute dtype when `layer` is a plain Linear at inference whose chosen kernel is oneDNN
    (the post-ops below are epilogues of that same GEMM), else None."""
    if not isinstance(layer, nn.Linear) or _needs_grad(x, layer.weight, layer.bias):
        return None
    dtype = compute_dtype(x)
    w = layer.weight
    if w.dtype not in onednn.DTYPES or _kernel("linear", x, dtype, False, (w.shape[1], w.shape[0])) != "onednn":
        return None
    return dtype


def linear_act(x: torch.Tensor, layer: nn.Module, act_name: str, act) -> torch.Tensor:
    """act(layer(x)); at inference on oneDNN the activation is the GEMM's post-op (one pass less
    over the [N, 4D] output)."""
    dtype = _fusable(x, layer)
    if dtype is None or act_name not in onednn.POST_OPS:
        return act(layer(x))
    packed, b = onednn.packed_weight((layer.weight,), (layer.bias,), dtype)
    x2d = x.reshape(-1, x.shape[-1])
    y = onednn.gemm(x2d, packed, b, act_name, dtype=dtype,
                    rows_parallel=_rows_parallel(x2d, dtype, tuple(layer.weight.shape[::-1])))
    return y.view(*x.shape[:-1], layer.out_features)


def linear_add(x: torch.Tensor, layer: nn.Module, other: torch.Tensor) -> torch.Tensor:
    """other + layer(x); at inference on oneDNN in fp32 the add is the GEMM's post-op. (In bf16 the
    residual stream stays fp32, so the add is not fused into a bf16 GEMM.)"""
    dtype = _fusable(x, layer)
    if dtype != torch.float32 or other.dtype != torch.float32 or onednn._BINARY is None:
        return other + layer(x)
    packed, b = onednn.packed_weight((layer.weight,), (layer.bias,), dtype)
    y = onednn.gemm_add(x.reshape(-1, x.shape[-1]).contiguous(), packed, b,
                        other.reshape(-1, layer.out_features).contiguous())
    return y.view(*x.shape[:-1], layer.out_features)


def stacked_plain(x: torch.Tensor, weights, biases) -> torch.Tensor:
    return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)


def stacked_onednn(x: torch.Tensor, weights: tuple, biases: tuple, terms: tuple, spans: tuple = ()) -> torch.Tensor:
    """x [W_1; ...; W_k]^T + b (+ low-rank terms on column spans) as one packed GEMM [N, sum out]."""
    dtype = compute_dtype(x)
    x2d = x.reshape(-1, x.shape[-1])
    if _needs_grad(x, *terms):
        y = onednn.LowRankStackedFn.apply(x2d.to(dtype).contiguous(), weights, biases, spans, *terms)
    else:
        packed, b = onednn.packed_weight(weights, biases, dtype)
        shape = (weights[0].shape[1], *(w.shape[0] for w in weights))
        y = onednn.gemm(x2d, packed, b, dtype=dtype, rows_parallel=_rows_parallel(x2d, dtype, shape))
    return y.view(*x.shape[:-1], y.shape[-1])


def stacked_linear(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> torch.Tensor:
    """cat([layer(x) for layer in layers], -1): Q, K and V reading the same input. As one GEMM over
    the stacked weights where they are frozen (always at inference; in training with LoRA, whose
    low-rank terms are added to their slices, or prefix tuning) and the measurement says so. Three
    int8 layers (infer/quantize.py) run as one int8 GEMM unless LMFORGE_KERNELS forces stacked=plain."""
    if int8.is_int8(layers):
        if CHOICES.forced("stacked") == "plain":
            return torch.cat([m(x) for m in layers], dim=-1)
        return int8.stacked_linear(x, layers)
    # a layer is a Linear or a LowRankWrapper of one; anything else (another adapter) runs plain
    bases = tuple(m.base if isinstance(m, LowRankWrapper) else m for m in layers)
    # plain Linears, all with a bias or all without (Llama's): one stacked bias or none
    plain_bases = all(isinstance(b, nn.Linear) for b in bases) and len({b.bias is None for b in bases}) == 1
    frozen = plain_bases and (not torch.is_grad_enabled() or not any(
        p.requires_grad for b in bases for p in b.parameters()))
    wrapped = [m for m, b in zip(layers, bases) if m is not b]
    if not frozen or (wrapped and (x.dim() != 2 or not torch.is_grad_enabled())):
        return torch.cat([m(x) for m in layers], dim=-1)
    dtype = compute_dtype(x)
    weights = tuple(b.weight for b in bases)
    biases = tuple(b.bias for b in bases)
    shape = (weights[0].shape[1], *(w.shape[0] for w in weights))
    train = torch.is_grad_enabled() and (x.requires_grad or bool(wrapped))
    if any(w.dtype not in onednn.DTYPES for w in weights) or _kernel("stacked", x, dtype, train, shape) != "onednn":
        return torch.cat([m(x) for m in layers], dim=-1)
    spans, terms, lo = [], [], 0
    for m, b in zip(layers, bases):
        if m is not b:
            updates = m.low_rank_updates(x)   # None (a mixed batch) comes before any work is done
            if updates is None:
                return torch.cat([m(x) for m in layers], dim=-1)
            for h, B, scale in updates:
                spans.append((lo, lo + b.out_features, scale))
                terms += [h, B]
        lo += b.out_features
    return stacked_onednn(x, weights, biases, tuple(terms), tuple(spans))
