"""Attention and dropout masks: the plain formulas, with the CPU's faster random masks.

packed_attention() is inference attention straight on a packed stream's rows, by the compiled kernel
where this machine measured it faster (calibrate.py, op `packed_attention`), else None: the caller
runs its plain path. attend() is SDPA where SDPA has a fused kernel; with attention dropout on a CPU it computes the same
softmax(q k^T / sqrt(d) + mask) v by hand with keep_mask's masks (SDPA's CPU dropout falls back to
that math anyway, with slower sampling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.kernels.calibrate import choose


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean mask shaped like `like`, True with probability 1 - p. On CPUs it is cut from 64-bit
    random words, four 16-bit lanes each (a full-range random_ fills all 64 bits; the default range
    gives 63): several times faster than bernoulli or uniform sampling per element. p is rounded to a
    multiple of 1/65536. Elsewhere it is torch's own uniform sampling."""
    if like.device.type != "cpu":
        return torch.rand_like(like) >= p
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)
    keep = words.view(torch.int16) >= -32768 + round(p * 65536)       # uniform over int16, contiguous
    return keep[:n].view(like.shape)


def sdpa(q, k, v, mask: torch.Tensor | None, is_causal: bool, fp32: bool = False) -> torch.Tensor:
    """torch's SDPA; fp32: on q, k, v (and a float mask) cast to fp32, the output cast back to q's
    dtype (calibrate.py's `attention=fp32` kernel for bf16 training on CPUs where that is faster)."""
    if not fp32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    with torch.autocast(q.device.type, enabled=False):   # autocast would cast the fp32 inputs back
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal)
    return y.to(q.dtype)


def _in_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: bool) -> bool:
    """bf16 attention that needs gradients, on a CPU: in fp32 where this machine measured that faster
    (calibrate.py, op `attention`, by heads x head size x with or without dropout, and key count)."""
    if not (q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return False
    shape = (q.shape[1], q.shape[-1], int(dropout))
    return choose("attention", q.device, q.dtype, True, shape, k.shape[-2]) == "fp32"


def dropout_attention(q, k, v, mask: torch.Tensor | None, dropout_p: float, is_causal: bool = False,
                      fp32: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with the probabilities dropped by keep_mask, by hand (SDPA's
    CPU dropout falls back to this math with slower sampling); fp32: on q, k, v (and a float mask)
    cast to fp32, the output cast back (the same masks: keep_mask draws by element count)."""
    if fp32:
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        with torch.autocast(q.device.type, enabled=False):   # autocast would cast the fp32 inputs back
            return dropout_attention(q.float(), k.float(), v.float(), mask, dropout_p, is_causal).to(q.dtype)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)              # [B, H, T, S]
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    probs = scores.softmax(-1)
    probs = probs * keep_mask(probs, dropout_p).to(probs.dtype).mul_(1.0 / (1.0 - dropout_p))
    return probs @ v


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     heads: int, kv_heads: int, causal: bool) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(d) [+ causal mask]) v within each sequence of a packed stream: q [N, H Dh],
    k and v [N, Hkv Dh] (views with contiguous rows, e.g. splits of one Q/K/V projection), sequence b
    at rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1, query head h reading key/value head h // (H / Hkv)
    -> [N, H Dh]. None unless the compiled kernel applies (a CPU, fp32 or bf16, no gradient needed)
    and was chosen for these shapes on this machine."""
    if (q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16)
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    shape = (heads, kv_heads, q.shape[1] // heads, int(causal))
    if choose("packed_attention", q.device, q.dtype, False, shape, max_len) != "compiled":
        return None
    from lmforge.kernels import compiled

    width = compiled.vector_width()
    if not width or shape[2] % width:   # forced where it cannot run: plain
        return None
    return compiled.library().packed_attention(q, k, v, cu_seqlens, heads, kv_heads, causal)


def attend(q, k, v, mask: torch.Tensor | None, dropout_p: float, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over [B, H, T, Dh]. With dropout, the probabilities are
    dropped with keep_mask (SDPA's CPU path would fall back to the same math with slower sampling);
    without, SDPA picks its fused kernel. mask: boolean keep-mask or additive, broadcastable."""
    if dropout_p == 0 or q.device.type != "cpu":
        if dropout_p:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        return sdpa(q, k, v, mask, is_causal, fp32=_in_fp32(q, k, v, False))
    return dropout_attention(q, k, v, mask, dropout_p, is_causal, fp32=_in_fp32(q, k, v, True))
