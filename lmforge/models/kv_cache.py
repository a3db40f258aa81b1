"""A preallocated key/value cache for incremental decoding.

Keys and values of every layer live in one buffer per kind, so decoding a token writes in place
instead of concatenating (which would copy the whole past at every step).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 max_length: int, dtype=torch.float32, device=None):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens already cached; advanced once per forward, after every layer

    @classmethod
    def for_model(cls, config, batch_size: int, max_length: int, dtype=torch.float32, device=None):
        # grouped-query attention caches its Hkv key/value heads, not the H query heads they serve
        return cls(config.num_layers, batch_size, config.num_kv_heads, config.head_dim,
                   max_length, dtype, device)

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, H, T, Dh] after the cached ones; return all [B, H, length + T, Dh]."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {end} were needed")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the surviving beams)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
