"""A preallocated key/value cache for incremental decoding, with a length per sequence.

Keys and values of every layer live in one buffer per kind, [layers, rows, Hkv, max_length, Dh], so
decoding a token writes in place instead of concatenating (which would copy the whole past at every
step). Each row (one sequence) has its own length: prompts of different lengths sit in the cache
without left padding, every decode step appends one token per row at that row's own next slot, and
a row whose sequence has finished is dropped (`keep`), so the steps after it compute live rows only.

Two ways to fill it:
- padded (`update`, `advance`): a [B, T] chunk appended to every row alike, so rows keep equal
  lengths (left padding, if any, is cached too and masked by the caller's attention_mask);
- packed (`begin`, `write`, `keys`, `end`): whole prompts as one packed stream into empty rows (the
  prefill), then one token per row per step (models/packing.py's layout; models/generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CacheStep:
    """Where one packed forward's N tokens go, decided once (begin) and read by every layer."""
    rows: torch.Tensor       # [N] cache row of each token (its sequence)
    slots: torch.Tensor      # [N] slot of each token in its row = its position in the sequence
    prefill: bool            # the rows were empty: the stream attends to itself (no cached keys)
    lengths: torch.Tensor    # [B] each row's length after this forward
    longest: int             # max(lengths), a Python int: slicing needs no device sync
    index: torch.Tensor      # [N Hkv] where each token's heads go in a layer's [B Hkv S, Dh] view
    key_mask: torch.Tensor | None = None   # one token per row: [B, 1, 1, longest], true on the row's own slots
    _biases: dict = field(default_factory=dict)

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """key_mask as an additive mask [B, 1, 1, longest] of this dtype, made once per forward: SDPA
        would convert a boolean mask in every layer. The most negative finite value, not -inf: no row
        is without keys (its own token), but finite stays NaN-free whatever the kernel does."""
        if dtype not in self._biases:
            bias = torch.zeros(self.key_mask.shape, dtype=dtype, device=self.key_mask.device)
            self._biases[dtype] = bias.masked_fill(~self.key_mask, torch.finfo(dtype).min)
        return self._biases[dtype]


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 max_length: int, dtype=torch.float32, device=None, reserved: int = 0):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        # slots [0, reserved) of every row hold a layer's prefix-layer keys and values (packed
        # decoding): written once by the prefill, attended to like the row's own keys, so a decode
        # step does not concatenate them with the whole past in every layer
        self.reserved = reserved
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row
        self._longest = 0        # max(lengths) as a Python int
        self._uniform = True     # every row has the same length (what the padded path needs)
        self.step: CacheStep | None = None   # the packed forward in progress

    @classmethod
    def for_model(cls, config, batch_size: int, max_length: int, dtype=torch.float32, device=None,
                  reserved: int = 0):
        # grouped-query attention caches its Hkv key/value heads, not the H query heads they serve
        layers = config.num_decoder_layers if config.is_encoder_decoder else config.num_layers
        return cls(layers, batch_size, config.num_kv_heads, config.head_dim,
                   max_length, dtype, device, reserved)

    @property
    def empty(self) -> bool:
        """Nothing cached yet: the next packed forward is a prefill."""
        return self._longest == 0

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def _room(self, end: int) -> None:
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens per sequence; {end} were needed")

    # -- padded: every row advances together -----------------------------------------------------
    @property
    def length(self) -> int:
        """The length every row has (padded decoding, where rows advance together)."""
        if self.reserved:
            raise ValueError("this cache reserves slots for prefix keys (packed decoding): continue it with "
                             "packed steps")
        if not self._uniform:
            raise ValueError("this cache's rows have different lengths (packed decoding): continue it with "
                             "packed steps, one token per sequence")
        return self._longest

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, Hkv, T, Dh] after the cached ones; return all [B, Hkv, length + T, Dh]."""
        start = self.length
        end = start + k.shape[2]
        self._room(end)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.lengths += n
        self._longest += n

    # -- packed: whole prompts into empty rows, then one token per row -----------------------------
    def begin(self, packed) -> CacheStep:
        """Plan a packed forward (a models.packing.Packed stream whose sequence b is row b): either the
        prefill of empty rows, or one new token per row. Returns the plan (also self.step)."""
        B = packed.batch_size
        if B != self.batch_size:
            raise ValueError(f"the packed batch has {B} sequences but the KV cache {self.batch_size} rows")
        if self._longest == 0:                       # prefill: each prompt from position 0
            R = self.reserved                        # after the reserved slots, if any
            lengths, longest = packed.lengths + R, packed.max_len + R
            rows, slots, prefill, key_mask = packed.seq_ids, packed.position_ids + R, True, None
        elif packed.num_tokens == B:                 # a decode step: each token after its row's past
            lengths, longest = self.lengths + 1, self._longest + 1
            rows = torch.arange(B, device=self.lengths.device)
            slots, prefill = self.lengths, False
            # row b's keys are its own first lengths[b] slots; the rest are other rows' room or stale
            key_mask = (torch.arange(longest, device=rows.device) < lengths[:, None])[:, None, None, :]
        else:
            raise ValueError("a packed forward with a KV cache takes whole prompts into an empty cache, "
                             "or one token per sequence")
        self._room(longest)
        # a layer's buffer [B, Hkv, S_max, Dh] seen as [B Hkv S_max, Dh]: token n's head h goes to row
        # (rows[n] Hkv + h) S_max + slots[n]; one index_copy_ per layer then writes every token
        Hkv, S_max = self.k.shape[2], self.max_length
        heads = torch.arange(Hkv, device=rows.device)
        index = ((rows[:, None] * Hkv + heads) * S_max + slots[:, None]).reshape(-1)      # [N Hkv]
        self.step = CacheStep(rows, slots, prefill, lengths, longest, index, key_mask)
        return self.step

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the stream's keys and values [N, Hkv, Dh] at their rows and slots (self.step)."""
        index, Dh = self.step.index, k.shape[-1]
        # [N, Hkv, Dh] -> [N Hkv, Dh] rows, into the layer's [B Hkv S_max, Dh] view (contiguous: a
        # layer's rows are one block even after keep() left the buffer as a view)
        self.k[layer].view(-1, Dh).index_copy_(0, index, k.reshape(-1, Dh).to(self.k.dtype))
        self.v[layer].view(-1, Dh).index_copy_(0, index, v.reshape(-1, Dh).to(self.v.dtype))

    def write_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where write() stores: the layer's keys and values as rows [B Hkv S_max, Dh] and the row of
        each token's key/value head [N Hkv] (self.step), for a kernel that stores them itself."""
        Dh = self.k.shape[-1]
        return self.k[layer].view(-1, Dh), self.v[layer].view(-1, Dh), self.step.index

    def write_reserved(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A layer's prefix keys and values [Hkv, reserved, Dh] into the reserved slots of every row."""
        self.k[layer, :, :, :self.reserved] = k.to(self.k.dtype)
        self.v[layer, :, :, :self.reserved] = v.to(self.v.dtype)

    def keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's keys and values [B, Hkv, S, Dh] (S: the longest row, this token included;
        step.key_mask says which slots are each row's own)."""
        S = self.step.longest
        return self.k[layer, :, :, :S], self.v[layer, :, :, :S]

    def end(self) -> None:
        """The packed forward has written every layer: its tokens now count as cached."""
        s, self.step = self.step, None
        if s.prefill:   # equal prompt lengths leave the rows uniform (no sync: the stream's size says so)
            self._uniform = s.longest * self.batch_size == s.rows.numel()
        self.lengths, self._longest = s.lengths, s.longest

    # -- rows ------------------------------------------------------------------------------------
    def keep(self, rows: torch.Tensor) -> None:
        """Keep these rows [R], in this order: a finished sequence leaves the batch, and beam search keeps
        the beams that continue (a row twice where two continuations extend one beam)."""
        R = rows.numel()
        if R > self.batch_size:   # more rows than the buffer has (beams fanning out of their prompt)
            # zeros, not empty: attention masks the slots past a row's length, but a NaN left in
            # memory there would still reach the output (0 probability x NaN value = NaN)
            k = self.k.new_zeros(self.k.shape[0], R, *self.k.shape[2:])
            v = self.v.new_zeros(k.shape)
            to, src = torch.arange(R, device=rows.device), rows
        else:                     # in place; the rows past R are left behind as a view's unused tail
            k, v = self.k[:, :R], self.v[:, :R]
            # only rows that change are copied (a row kept in its own place is not: the rows before a
            # finished one, a beam extended by its own continuation)
            to = (rows != torch.arange(R, device=rows.device)).nonzero().squeeze(1)   # [M]
            src = rows[to]
        self._copy_rows(k, to, self.k, src)
        self._copy_rows(v, to, self.v, src)
        self.k, self.v = k, v
        self.lengths = self.lengths[rows]
        self._longest = int(self.lengths.max()) if R else 0

    def _copy_rows(self, new: torch.Tensor, to: torch.Tensor, old: torch.Tensor, rows: torch.Tensor) -> None:
        """new[:, to] = old[:, rows] over the filled slots only. Layer by layer, index_select then
        index_copy_ on a layer's [B, Hkv, S, Dh]: a quarter of the time of one advanced-index copy
        over all layers (beam 10 on 4 SmolLM2 prompts, bf16: 12 against 40 ms a step). The gather is
        a copy made before the write, so a row may move onto a row another kept row is read from."""
        if not to.numel():
            return
        S = self._longest
        for layer in range(old.shape[0]):
            new[layer, :, :, :S].index_copy_(0, to, old[layer, :, :, :S].index_select(0, rows))

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the surviving beams)."""
        self.keep(index)
