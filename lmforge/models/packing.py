"""Unpadded ("packed") execution: a batch of B variable-length sequences as one stream of N tokens.

Every per-token operation (embeddings, the Q/K/V/output projections, the FFN, LayerNorms, LoRA and
bottleneck adapters) then runs on [N, D] with no work spent on padding. Only attention needs to
know where one sequence ends and the next begins; it scatters the stream into a [B, T_max] layout
for one batched SDPA call with a key-padding (and, for decoders, causal) mask, and gathers the real
rows back. At SST-2 lengths attention is a small part of the FLOPs, so this keeps nearly all of the
saving while using the fastest attention kernel each device has.

Attention runs per length bucket: the sequences are sorted by length and cut into a few groups,
each padded only to its own longest member, so the quadratic part wastes little on padding too
(`groups`, `attn_index`); heads and callers that want a plain padded view use `pad`.

The layout: sequence b occupies stream positions cu_seqlens[b] .. cu_seqlens[b+1]-1 (cumulative
sequence lengths, as in FlashAttention's varlen API).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Group:
    """Sequences that attend together: n of them, padded to T, at rows [start, start + n T) of the
    bucketed attention layout."""
    seqs: torch.Tensor      # [n] sequence ids
    n: int
    T: int
    start: int


GROUP_MIN = 8   # fewer sequences than this in a group: the extra kernel calls cost more than padding
GROUPS = 4      # at most this many length buckets per batch


@dataclass(eq=False)
class Packed:
    cu_seqlens: torch.Tensor        # [B + 1] int64, on the model's device
    max_len: int                    # longest sequence (a Python int: no device sync per layer)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_lengths(cls, lengths, device=None) -> "Packed":
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if lengths.numel() == 0 or bool((lengths < 1).any()):
            raise ValueError(f"packed sequences need lengths >= 1, got {lengths.tolist()}")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
        cu[1:] = lengths.cumsum(0)
        return cls(cu.to(device), int(lengths.max()))

    @classmethod
    def singles(cls, n: int, device=None) -> "Packed":
        """n sequences of one token each (a decode step: one new token per live sequence)."""
        steps = torch.arange(n + 1, device=device)
        packed = cls(steps, 1)
        packed._cache.update(n=n, seq=steps[:n], pos=torch.zeros(n, dtype=torch.long, device=device))
        return packed

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Packed":
        """From a right-padded [B, T] mask (1 = token)."""
        return cls.from_lengths(attention_mask.sum(-1).cpu(), attention_mask.device)

    # -- derived index tensors, built once per batch and shared by every layer ------------------
    def _get(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self._get("n", lambda: int(self.cu_seqlens[-1]))

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]                        # [B]

    @property
    def seq_ids(self) -> torch.Tensor:
        """Which sequence each token belongs to [N]."""
        return self._get("seq", lambda: torch.repeat_interleave(
            torch.arange(self.batch_size, device=self.cu_seqlens.device), self.lengths,
            output_size=self.num_tokens))

    @property
    def position_ids(self) -> torch.Tensor:
        """Position of each token inside its own sequence [N]: 0, 1, ... per sequence."""
        def build():
            pos = torch.arange(self.num_tokens, device=self.cu_seqlens.device)
            return pos if self.batch_size == 1 else pos - self.cu_seqlens[self.seq_ids]
        return self._get("pos", build)

    @property
    def pad_index(self) -> torch.Tensor:
        """Row of each token in the padded [B * T_max] layout [N]."""
        return self._get("pad", lambda: self.seq_ids * self.max_len + self.position_ids)

    @property
    def first(self) -> torch.Tensor:
        return self.cu_seqlens[:-1]                                               # [B]

    @property
    def last(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - 1                                            # [B]

    def attention_mask(self) -> torch.Tensor:
        """The equivalent right-padded [B, T_max] mask (1 = token)."""
        def build():
            m = torch.zeros(self.batch_size * self.max_len, dtype=torch.long, device=self.cu_seqlens.device)
            m[self.pad_index] = 1
            return m.view(self.batch_size, self.max_len)
        return self._get("mask", build)

    # -- bucketed attention layout --------------------------------------------------------------
    @property
    def groups(self) -> list[Group]:
        def build():
            lengths = self.lengths.cpu()
            B, device = self.batch_size, self.cu_seqlens.device
            if B < 2 * GROUP_MIN or bool((lengths == lengths[0]).all()):
                order, size = torch.arange(B), B
            else:
                order = torch.sort(lengths, stable=True).indices
                size = max(GROUP_MIN, -(-B // GROUPS))
            out, start = [], 0
            for i in range(0, B, size):
                seqs = order[i:i + size]
                T = int(lengths[seqs].max())
                out.append(Group(seqs.to(device), len(seqs), T, start))
                start += len(seqs) * T
            return out
        return self._get("groups", build)

    @property
    def attn_index(self) -> torch.Tensor:
        """Row of each token in the bucketed attention layout [N]."""
        def build():
            base = torch.empty(self.batch_size, dtype=torch.long, device=self.cu_seqlens.device)
            for g in self.groups:
                base[g.seqs] = g.start + g.T * torch.arange(g.n, device=base.device)
            return base[self.seq_ids] + self.position_ids
        return self._get("attn_index", build)

    @property
    def attn_source(self) -> torch.Tensor:
        """The stream row each row of the bucketed attention layout reads [R]: its own token, or, for
        a padding row, the last token of the same sequence. Padding rows only need to be finite:
        as keys they are masked (probability exactly 0, so no gradient either), as queries their
        outputs are never gathered back. So the layout is one index_select instead of a scatter into a
        buffer whose padding is zeroed (bf16, 1,000 x 1,152: 0.14 against 0.42 ms on one core of an
        AMX Xeon; about 3% of a bf16 inference pass, within that pass's noise)."""
        def build():
            parts = []
            for g in self.groups:
                pos = torch.arange(g.T, device=self.cu_seqlens.device)
                last = self.lengths[g.seqs][:, None] - 1                             # [n, 1]
                parts.append((self.cu_seqlens[g.seqs][:, None] + torch.minimum(pos[None, :], last)).reshape(-1))
            return torch.cat(parts)                                                  # [R]
        return self._get("attn_source", build)

    @property
    def dense(self) -> bool:
        """True when the stream already is the attention layout (one group, no padding: a single
        sequence, or equal lengths), so attention needs no scatter or gather."""
        return self._get("dense", lambda: len(self.groups) == 1 and self.groups[0].n * self.groups[0].T
                         == self.num_tokens)

    @property
    def attn_rows(self) -> int:
        g = self.groups[-1]
        return g.start + g.n * g.T

    def group_mask(self, g: Group, causal: bool, prefix: int = 0) -> torch.Tensor | None:
        """Boolean keep-mask of group g: [n, 1, 1, P + T] or, causal, [n, 1, T, P + T]; None when
        nothing needs masking."""
        def build():
            pos = torch.arange(g.T, device=self.cu_seqlens.device)
            keep = pos[None, :] < self.lengths[g.seqs][:, None]                  # [n, T]
            if prefix:
                keep = torch.cat([keep.new_ones(g.n, prefix), keep], dim=1)
            keep = keep[:, None, None, :]
            if causal:
                tri = torch.ones(g.T, g.T, dtype=torch.bool, device=keep.device).tril()
                if prefix:
                    tri = torch.cat([tri.new_ones(g.T, prefix), tri], dim=1)
                keep = keep & tri[None, None]
            return keep
        def build_or_none():  # every layer asks: decide once per batch
            if not causal and not prefix and bool((self.lengths[g.seqs] == g.T).all()):
                return None
            return build()
        return self._get(("group_mask", g.start, causal, prefix), build_or_none)

    # -- moving between the stream and the padded layout ------------------------------------------
    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T_max, ...] with zeros in the padding."""
        B, T = self.batch_size, self.max_len
        out = x.new_zeros((B * T, *x.shape[1:]))
        out = out.index_copy(0, self.pad_index, x)
        return out.view(B, T, *x.shape[1:])


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, *others: torch.Tensor):
    """A right-padded batch [B, T] -> (ids [N], Packed); more [B, T] tensors (token types) are
    packed the same way and returned after them."""
    packed = Packed.from_mask(attention_mask)
    rows = _padded_rows(packed, input_ids.shape[1])
    flat = [t.reshape(-1).index_select(0, rows) for t in (input_ids, *others)]
    return (flat[0], packed, *flat[1:])


def _padded_rows(packed: Packed, T: int) -> torch.Tensor:
    """Rows of the [B * T] padded batch that hold tokens (T may exceed T_max)."""
    return packed.seq_ids * T + packed.position_ids
