"""A residual add and the normalisation after it: norm(residual + y), in one pass where the compiled
kernel (csrc/add_norm.cpp) was chosen for this machine (calibrate.py, op `add_norm`), else the formula.

Post-norm blocks (BERT) compute x = LN(x + f(x)) after each sublayer; pre-norm blocks (GPT-2, Llama)
carry s = x + f(x) on and normalise it for the next sublayer. At inference the formula is an add
(under bf16 autocast a mixed bf16 + fp32 one), a norm, and then the next GEMM's cast of the normed
rows to bf16: three passes over [N, D] that the kernel makes one. It writes the normed rows in the
dtype the GEMMs reading them compute in (under bf16 autocast, bf16: a post-norm block's residual
stream is then bf16 between layers, the statistics still fp32), padded with zero rows to the GEMM's
row bucket, which kernels/onednn.py then reads in place.
"""

from __future__ import annotations

from abc import ABC

import torch
from torch import nn

from lmforge.kernels import onednn
from lmforge.kernels.calibrate import choose
from lmforge.kernels.gemm import compute_dtype


class RMSNormBase(nn.Module, ABC):
    """What the kernel needs of an RMSNorm (models/layers.py RMSNorm subclasses it): a float32
    `weight` [D] and `eps`; forward(x) = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32."""
    weight: nn.Parameter
    eps: float


def _params(norm: nn.Module):
    """(weight, bias, eps, rms) of a norm the kernel computes, else None."""
    if isinstance(norm, RMSNormBase):
        return norm.weight, None, norm.eps, True
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and len(norm.normalized_shape) == 1:
        return norm.weight, norm.bias, norm.eps, False
    return None


def add_norm(y: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
             with_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(residual + y), residual + y if with_sum else None) for y and residual [.., D]. Where the
    kernel runs, the normed output is in the GEMMs' compute dtype (autocast's where it is on) and
    the sum in the residual's dtype."""
    dtype = compute_dtype(residual)       # the GEMMs reading the normed rows compute in it
    params = _kernel_params(y, residual, norm, dtype)
    if params is None:
        s = residual + y
        return norm(s), (s if with_sum else None)
    from lmforge.kernels import compiled

    weight, bias, eps, rms = params
    D = y.shape[-1]
    y2, r2 = y.reshape(-1, D), residual.reshape(-1, D)              # [N, D]
    N = y2.shape[0]
    out, s = compiled.library().add_norm(y2, r2, weight, bias, eps, rms, with_sum, dtype, onednn.bucket_rows(N))
    return out[:N].view(y.shape), (s.view(residual.shape) if with_sum else None)


def _kernel_params(y: torch.Tensor, residual: torch.Tensor, norm: nn.Module, dtype: torch.dtype):
    """The norm's (weight, bias, eps, rms) when the compiled kernel runs this call, else None: a CPU,
    fp32 or bf16 rows with contiguous last dimensions, no gradient needed, and the kernel chosen."""
    params = _params(norm)
    if params is None or y.device.type != "cpu" or y.shape != residual.shape or y.numel() == 0:
        return None
    weight, bias = params[0], params[1]
    if (y.dtype not in onednn.DTYPES or residual.dtype not in onednn.DTYPES or y.stride(-1) != 1
            or residual.stride(-1) != 1 or weight.dtype != torch.float32
            or (bias is not None and bias.dtype != torch.float32)):
        return None
    if torch.is_grad_enabled() and (y.requires_grad or residual.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None
    D = y.shape[-1]
    if choose("add_norm", y.device, dtype, False, (D, int(params[3])), y.numel() // D) != "compiled":
        return None
    from lmforge.kernels import compiled

    return params if compiled.library() is not None else None   # forced where nothing was built: plain
