"""What an encoder-decoder's decoder attends to: the encoder's output (its "memory", Vaswani et al.
2017) and which of its positions are real tokens.

Every decoder layer's cross-attention projects the memory to keys and values of its own. They do not
change while the decoder runs, so each layer's are computed once per Memory and kept: a generation
step then projects only its new token's query. Beam search and finished sequences select rows
(`keep`), of the memory and of the keys and values already made, in the decoder's cache order.
"""

from __future__ import annotations

import torch


class Memory:
    def __init__(self, states: torch.Tensor, mask: torch.Tensor | None = None):
        self.states = states                      # [B, S, D] the encoder's last layer
        self.mask = mask                          # [B, S] 1 = token, 0 = padding; None: no padding
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bias: dict[torch.dtype, torch.Tensor | None] = {}

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """An additive key mask [B, 1, 1, S] (the most negative finite value at padding), or None
        without padding; made once per dtype."""
        if dtype not in self._bias:
            if self.mask is None or bool(self.mask.all()):
                self._bias[dtype] = None
            else:
                keep = self.mask.bool()[:, None, None, :]
                bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
                self._bias[dtype] = bias.masked_fill(~keep, torch.finfo(dtype).min)
        return self._bias[dtype]

    def keys_values(self, layer: int, project) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values [B, Hkv, S, Dh]: project(states) the first time, then kept."""
        if layer not in self._kv:
            self._kv[layer] = project(self.states)
        return self._kv[layer]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep these rows [R], in this order (a row twice where two beams share a source)."""
        self.states = self.states.index_select(0, rows)
        self.mask = None if self.mask is None else self.mask.index_select(0, rows)
        self._kv = {i: (k.index_select(0, rows), v.index_select(0, rows)) for i, (k, v) in self._kv.items()}
        self._bias = {d: None if b is None else b.index_select(0, rows) for d, b in self._bias.items()}
