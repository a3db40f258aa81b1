"""nn.Linear with oneDNN's prepacked-weight GEMM on CPUs.

PyTorch's default fp32 CPU GEMM (torch.mm / F.linear) reaches about 200 GFLOP/s on this 2-core
machine; oneDNN's linear with the weight reordered once into its blocked layout reaches about 490
(the cores' FMA peak), and over 300 for the thin matrices of batch-1 inference. The weight is
reordered once and reused until it changes (the cache is keyed by the tensor's version counter, so
an optimizer step, a LoRA merge or a checkpoint load all invalidate it). Backward: the input gradient
uses a prepacked transposed weight; the weight gradient is one oneDNN GEMM too.

Parameter names, state dicts and `isinstance(m, nn.Linear)` are those of nn.Linear. On other devices,
dtypes, or builds without oneDNN, forward is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MKLDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _packed_linear(x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")


def _weight_grad(gy: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """gy^T x [out, in] as a oneDNN linear whose 'weight' is the narrower of x^T and gy^T, reordered
    on the fly (about 1.3x torch.mm here, reorder included)."""
    # The reorder reads the transposed view directly (no contiguous copy first); the GEMM's input
    # must be contiguous.
    if x2d.shape[1] <= gy.shape[1]:   # in <= out: pack x^T [in, N]
        return _packed_linear(gy.t().contiguous(), torch.ops.mkldnn._reorder_linear_weight(x2d.t()), None)
    # contiguous: optimizers' fused kernels read gradients as flat buffers with the parameter's strides
    return _packed_linear(x2d.t().contiguous(), torch.ops.mkldnn._reorder_linear_weight(gy.t()),
                          None).t().contiguous()


class _PackedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, module):
        ctx.module = module
        ctx.save_for_backward(x2d if weight.requires_grad else None)
        ctx.has_bias = bias is not None
        return _packed_linear(x2d, module._pack(False), bias)

    @staticmethod
    def backward(ctx, gy):
        (x2d,) = ctx.saved_tensors
        module = ctx.module
        gy = gy.contiguous()
        gx = _packed_linear(gy, module._pack(True), None) if ctx.needs_input_grad[0] else None
        gw = _weight_grad(gy, x2d) if ctx.needs_input_grad[1] else None
        gb = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class Linear(nn.Linear):
    """Drop-in nn.Linear; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packs: dict = {}

    def _pack(self, transposed: bool) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        cached = self._packs.get(transposed)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                src = w.detach().t() if transposed else w.detach()  # the reorder reads the strided view
                cached = (key, torch.ops.mkldnn._reorder_linear_weight(src))
            self._packs[transposed] = cached
        return cached[1]

    def _fast(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (_MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and x.numel() > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        x2d = x.reshape(-1, x.shape[-1])
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            y = _PackedLinearFn.apply(x2d, self.weight, self.bias, self)
        else:
            y = _packed_linear(x2d, self._pack(False), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def __getstate__(self):  # deepcopy / pickle: packed weights are a cache, not state
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_packs"] = {}
        return state


# oneDNN post-op (name, algorithm) for each activation the models use.
_POST_OPS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
             "relu": ("relu", "")}


def _inference(x: torch.Tensor, *modules: nn.Module) -> bool:
    """True when x may take a fused, forward-only oneDNN path through these exact (unwrapped) Linears."""
    if not all(type(m) is Linear and m._fast(x) for m in modules):
        return False
    return not torch.is_grad_enabled() or not (
        x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters()))


def fused_linear(x: torch.Tensor, module: Linear, act: str | None = None,
                 add: torch.Tensor | None = None) -> torch.Tensor | None:
    """Inference only: act(x W^T + b), or x W^T + b + add, as one oneDNN GEMM with a post-op, saving a
    pass over the output. None when the fast path does not apply (training, a wrapped layer, a GPU)."""
    if not _inference(x, module) or (act is not None and act not in _POST_OPS):
        return None
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    if add is not None:
        y = torch.ops.mkldnn._linear_pointwise.binary(
            x2d, add.reshape(-1, module.out_features).contiguous(), module._pack(False), module.bias, "add")
    else:
        name, algo = _POST_OPS[act] if act else ("none", "")
        y = torch.ops.mkldnn._linear_pointwise(x2d, module._pack(False), module.bias, name, [], algo)
    return y.view(*x.shape[:-1], module.out_features)


def _concat_packs(modules: tuple[Linear, ...], transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(prepacked stacked weight [sum out, in], or its transpose; stacked bias), cached on the first
    module until any of the weights or biases changes."""
    first = modules[0]
    key = tuple((m.weight.data_ptr(), m.weight._version, m.bias.data_ptr(), m.bias._version) for m in modules)
    slot = "concat_t" if transposed else "concat"
    cached = first._packs.get(slot)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            w = torch.cat([m.weight.detach() for m in modules])
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.t() if transposed else w),
                      torch.cat([m.bias.detach() for m in modules]))
        first._packs[slot] = cached
    return cached[1], cached[2]


def concat_linear(x: torch.Tensor, modules: tuple[Linear, ...]) -> torch.Tensor | None:
    """Inference only: [..., sum of out_features], several Linears reading the same input (Q, K, V)
    as one GEMM with their weights stacked (cached on the first module until any of them changes).
    None when the fast path does not apply."""
    if not _inference(x, *modules) or any(m.bias is None for m in modules):
        return None
    packed, bias = _concat_packs(modules, False)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


class _LowRankConcatFn(torch.autograd.Function):
    """y = x [W_1; ...; W_k]^T + b, then scale * h B^T added to each listed slice of y. The W are frozen:
    backward gives x one GEMM over the stacked weights, and each (h, B) its thin GEMMs."""

    @staticmethod
    def forward(ctx, x2d, modules, spans, *terms):
        packed, bias = _concat_packs(modules, False)
        y = torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")
        for (lo, hi, scale), (h, B) in zip(spans, zip(terms[0::2], terms[1::2])):
            y[:, lo:hi].addmm_(h, B.t(), alpha=scale)
        ctx.modules, ctx.spans = modules, spans
        ctx.save_for_backward(*terms)
        return y

    @staticmethod
    def backward(ctx, gy):
        gy = gy.contiguous()
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _packed_linear(gy, _concat_packs(ctx.modules, True)[0], None)
        grads = []
        terms = ctx.saved_tensors
        for i, (lo, hi, scale) in enumerate(ctx.spans):
            h, B = terms[2 * i], terms[2 * i + 1]
            g = gy[:, lo:hi]                                   # [N, out_i], strided
            gh = torch.mm(g, B).mul_(scale) if ctx.needs_input_grad[3 + 2 * i] else None
            gB = torch.mm(g.t(), h).mul_(scale) if ctx.needs_input_grad[4 + 2 * i] else None
            grads += [gh, gB]
        return (gx, None, None, *grads)


def lowrank_concat_linear(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """Training: [N, sum of out_features] of layers reading the same packed input x [N, in] (Q, K, V),
    each a frozen Linear or a wrapper of one with `.base` and `.low_rank_updates(x)` (LoRA), as one
    GEMM over the stacked frozen weights plus the wrappers' low-rank terms. Saves the three GEMMs'
    concatenation and their gradients' copies and sum. None when it does not apply (a trainable
    projection, a mixed-adapter batch, inference, a GPU)."""
    if x.dim() != 2 or not torch.is_grad_enabled():
        return None
    bases = tuple(getattr(m, "base", m) for m in layers)
    if not all(type(b) is Linear and b._fast(x) and b.bias is not None for b in bases) or any(
            p.requires_grad for b in bases for p in b.parameters()) or any(
            m is not b and not hasattr(m, "low_rank_updates") for m, b in zip(layers, bases)):
        return None
    spans, terms, lo = [], [], 0
    for m, b in zip(layers, bases):
        if m is not b:
            updates = m.low_rank_updates(x)   # None (a mixed batch) comes before any work is done
            if updates is None:
                return None
            for h, B, scale in updates:
                spans.append((lo, lo + b.out_features, scale))
                terms += [h, B]
        lo += b.out_features
    if not terms and not x.requires_grad:
        return None  # nothing to differentiate: the inference path (concat_linear) applies
    return _LowRankConcatFn.apply(x.contiguous(), bases, tuple(spans), *terms)
