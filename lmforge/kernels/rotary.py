"""Rotary positions (Su et al. 2021): the formula (rotate, rotate_stream: plain PyTorch, what
models/layers.py computes with), and rotate_store, the same on a packed stream's Q and K heads plus the
store of its keys and values into a KV cache as one compiled call where it was chosen for this machine
(calibrate.py, op `rotate_store`), else not at all: the caller then runs rotate_stream and
KVCache.write.

A decode step of a decoder is a few matrix-vector products and many tiny ops: rotating the heads took
about ten ops a layer (halves, negation, concatenations) and storing keys and values two more; at 30
layers a step, each op's dispatch cost counts as much as its work.
"""

from __future__ import annotations

import torch

from lmforge.kernels.calibrate import choose


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (a, b) = (x[i], x[i + Dh/2]) of x [.., Dh] to (a cos - b sin, b cos + a sin)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def rotate_stream(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], heads: int, kv_heads: int) -> torch.Tensor:
    """Rotary positions on the Q and K columns of a packed stream qkv [N, (H + 2 Hkv) Dh] (rope: (cos,
    sin) [N, 1, Dh]): the H + Hkv query and key heads are adjacent, so one rotation covers both (a
    decode step is a few hundred tiny ops; each one saved counts). A new tensor; V's columns as they were."""
    N, rotated = qkv.shape[0], heads + kv_heads
    Dh = qkv.shape[1] // (rotated + kv_heads)
    qk = rotate(qkv.view(N, rotated + kv_heads, Dh)[:, :rotated], *rope)     # [N, H + Hkv, Dh]
    return torch.cat([qk.reshape(N, rotated * Dh), qkv[:, rotated * Dh:]], dim=-1)


def rotate_store(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, heads: int, kv_heads: int,
                 target: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> bool:
    """In place on qkv [N, (H + 2 Hkv) Dh] (Q heads, K heads, V heads): each Q and K head rotated by its
    token's rope (cos, sin) [N, 1, Dh] (pairs i, i + Dh/2, as rotate() above); then, with a target
    (k_rows, v_rows [rows, Dh], index [N Hkv]), each token's rotated key head g and value head g stored
    at row index[n Hkv + g]. True when done here; False when nothing was done (the caller's plain path
    runs): gradients needed, not a CPU, other dtypes, or the compiled kernel not chosen or not built."""
    if (rope is None and target is None) or qkv.device.type != "cpu" or qkv.dim() != 2 or qkv.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and qkv.requires_grad:
        return False
    floats = (torch.float32, torch.bfloat16)
    tensors = [qkv] + (list(rope) if rope is not None else []) + (list(target[:2]) if target is not None else [])
    if any(t.dtype not in floats for t in tensors):
        return False
    Dh = qkv.shape[1] // (heads + 2 * kv_heads)
    shape = (heads, kv_heads, Dh, int(rope is not None), int(target is not None))
    if choose("rotate_store", qkv.device, qkv.dtype, False, shape, qkv.shape[0]) != "compiled":
        return False
    from lmforge.kernels import compiled

    lib = compiled.library()
    if lib is None:   # forced where nothing was built
        return False
    cos, sin = (t.reshape(qkv.shape[0], Dh) for t in rope) if rope is not None else (None, None)
    k_rows, v_rows, index = target if target is not None else (None, None, None)
    lib.rotate_store(qkv, cos, sin, heads, kv_heads, k_rows, v_rows, index)
    return True
