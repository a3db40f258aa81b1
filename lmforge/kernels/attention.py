"""Attention and dropout masks: the plain formulas, with the CPU's faster random masks.

attend() is SDPA where SDPA has a fused kernel; with attention dropout on a CPU it computes the same
softmax(q k^T / sqrt(d) + mask) v by hand with keep_mask's masks (SDPA's CPU dropout falls back to
that math anyway, with slower sampling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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



# Training in bf16 on a CPU, SDPA's fused kernel is slower in bf16 than in fp32 for short sequences:
# forward and backward of [32, 12, 32, 32] took 16.1 ms in bf16 against 3.5 ms cast to fp32 and back,
# [12, 4, 64, 32] causal 4.2 against 1.1, [32, 12, 128, 32] 71 against 30, and bf16 won only at 512
# keys (42 against 61 ms; AMX Xeon, torch 2.13, 2 threads). Up to this many keys, attention that
# needs gradients runs in fp32 (its inputs and output stay bf16; fp32 is also the more exact).
UPCAST_KEYS = 256


def _upcast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and k.shape[-2] <= UPCAST_KEYS
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def attend(q, k, v, mask: torch.Tensor | None, dropout_p: float, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over [B, H, T, Dh]. With dropout, the probabilities are
    dropped with keep_mask (SDPA's CPU path would fall back to the same math with slower sampling);
    without, SDPA picks its fused kernel. mask: boolean keep-mask or additive, broadcastable."""
    if dropout_p == 0 or q.device.type != "cpu":
        if _upcast(q, k, v):
            if mask is not None and mask.is_floating_point():
                mask = mask.float()
            with torch.autocast("cpu", enabled=False):   # autocast would cast the fp32 inputs back
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   is_causal=is_causal)
            return y.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
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
