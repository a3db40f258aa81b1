"""A model = the trunk + one head, configured by one ModelConfig, and a table of further heads by
adapter name (`adapter_heads`), so that an adapter travels with the head it was trained with.

Which adapters a call uses is an argument of `forward` (`adapters=`, see models/routing.py): the model
holds no "active adapter" and its `head` and `config` never change per call. Each row's head is looked
up from the routing: rows are grouped by head and each group runs through its own (None and adapters
without a head of their own: the base head)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import routing as _routing
from lmforge.models.config import ModelConfig
from lmforge.models.heads import build_head
from lmforge.models.kv_cache import KVCache
from lmforge.models.memory import Memory
from lmforge.models.packing import Packed
from lmforge.models.transformer import Transformer, init_weights


@dataclass
class ModelOutput:
    hidden_states: torch.Tensor                 # [B, T, D] last layer ([N, D] when packed)
    # head output: [B, C], [B, T, C], [B, T, V] or [B] (scalar); a list of B tensors [C_i] when the rows
    # of a mixed-adapter batch have classification heads of different widths
    logits: torch.Tensor | list | None = None
    pooled: torch.Tensor | None = None          # BERT pooler output [B, D]
    nsp_logits: torch.Tensor | None = None      # [B, 2] (pretraining head)
    values: torch.Tensor | None = None          # [B, T] (scalar head)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # an encoder-decoder: `transformer` is its decoder (the heads read its word table, as for any
        # decoder) and `encoder` reads the source with that same table
        self.transformer = Transformer(config, "decoder" if config.is_encoder_decoder else "whole")
        self.encoder = Transformer(config, "encoder") if config.is_encoder_decoder else None
        self.head = build_head(config)
        init_weights(self, config)
        # heads by adapter name, and each one's label settings (a partial ModelConfig): add_head()
        self.adapter_heads = nn.ModuleDict()
        self.adapter_head_configs: dict[str, dict] = {}
        self._adapters: dict[str, object] = {}   # what a routing may name: register_adapter()

    # -- adapter names ----------------------------------------------------------------------------
    def register_adapter(self, name: str, config: object = None) -> None:
        """Declare adapter `name` with its configuration (opaque here; the adapters package registers
        what it attaches), so that a routing naming an adapter the model lacks is an error, not
        silently the base model."""
        self._adapters = {**self._adapters, name: config}   # replaced, never mutated in place

    def unregister_adapter(self, name: str) -> None:
        self._adapters = {n: c for n, c in self._adapters.items() if n != name}
        self.remove_head(name)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    @property
    def adapter_configs(self) -> dict[str, object]:
        return dict(self._adapters)

    def check_routing(self, r: "_routing.Routing") -> None:
        known = self._adapters
        for n in r.names:
            if n not in known:
                raise ConfigError(f"no adapter named {n!r} (loaded: {', '.join(known) or 'none'})")

    # -- the head table ---------------------------------------------------------------------------
    def add_head(self, name: str, head: nn.Module, head_config: dict | None = None) -> None:
        """Give adapter `name` its own head (its label settings in head_config: num_labels, ...)."""
        self.adapter_heads[name] = head
        self.adapter_head_configs[name] = dict(head_config or {})

    def remove_head(self, name: str) -> None:
        if name in self.adapter_heads:
            del self.adapter_heads[name]
        self.adapter_head_configs.pop(name, None)

    def head_for(self, adapter: str | None) -> nn.Module | None:
        """The head that answers for `adapter` (None, or an adapter without a head: the base head)."""
        heads = self.adapter_heads
        return heads[adapter] if adapter is not None and adapter in heads else self.head

    def config_for(self, adapter: str | None) -> ModelConfig:
        """The config whose label settings (labels, num_labels, problem type) go with that head."""
        if adapter is None or adapter not in self.adapter_head_configs:
            return self.config
        return self.config.replace(**self.adapter_head_configs[adapter])

    def head_kind(self, adapter: str | None) -> str | None:
        """The kind of head that answers for `adapter`: the base head's, unless the adapter brought a
        head of another kind (head_config {"head": ...}; e.g. a classifier on a causal LM)."""
        return self.config_for(adapter).head

    def _head_groups(self, r: "_routing.Routing") -> tuple[str | None, list[tuple[nn.Module, list[int] | None]]]:
        """(kind, [(head, rows)]): one entry with rows None when one head serves every row."""
        if not r.mixed:
            own = [n for n in r.uniform if n in self.adapter_heads]
            name = own[0] if len(own) == 1 else None
            return self.head_kind(name), [(self.head_for(name), None)]
        groups: dict[int, tuple[nn.Module, list[int]]] = {}
        kinds = set()
        for i, n in enumerate(r.per_row):
            head = self.head_for(n)
            if id(head) not in groups:
                kinds.add(self.head_kind(n))
            groups.setdefault(id(head), (head, []))[1].append(i)
        if len(kinds) > 1:
            raise ConfigError(f"a batch mixing heads of different kinds ({', '.join(map(str, sorted(kinds, key=str)))}) "
                              "cannot run as one; run each kind's rows as its own batch")
        if len(groups) == 1:
            return kinds.pop(), [(next(iter(groups.values()))[0], None)]
        return kinds.pop(), list(groups.values())

    @property
    def device(self) -> torch.device:
        return self.transformer.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embeddings.word_embeddings.weight.dtype

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                  reserve_prefix: bool = False) -> KVCache:
        """Room for max_length tokens per sequence, and the virtual input tokens of prefix-embedding
        tuning when the current routing has them (they are cached as the first tokens of every row).
        reserve_prefix (packed decoding only): room for the prefix-layer keys and values the current
        routing has, in slots of their own before the tokens (KVCache.reserved)."""
        virtual = self.transformer.virtual_tokens()
        reserved = self.transformer.layer_prefix_length() if reserve_prefix else 0
        room = max_length + (0 if virtual is None else virtual.shape[0]) + reserved
        # by default keys and values are kept in the dtype they are computed in: autocast's where it
        # is on (bf16 GEMMs make them, and attention would cast an fp32 cache back to bf16 at every
        # step: a copy of the whole past per layer; the values are the same either way), else the
        # weights'
        if dtype is None:
            on = torch.is_autocast_enabled(self.device.type)
            dtype = torch.get_autocast_dtype(self.device.type) if on else self.dtype
        return KVCache.for_model(self.config, batch_size, room, dtype, self.device, reserved)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Memory:
        """An encoder-decoder's source [B, S] (1 = token in attention_mask) -> the encoder's output,
        which every decoder call of this batch may reuse (forward's memory=)."""
        if self.encoder is None:
            raise ValueError(f"a {self.config.model_type} model has no encoder (encode is for encoder-decoders)")
        states = self.encoder(input_ids, attention_mask, words=self.transformer.embeddings.word_embeddings)
        return Memory(states, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,                     # [B, T], or [N] with packed
        attention_mask: torch.Tensor | None = None,  # [B, past + T]; unused with packed
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,                # padded: rows advance together; packed: see KVCache.begin
        packed: Packed | None = None,                # unpadded batch: see models/packing.py
        positions: torch.Tensor | None = None,       # LM heads: score only these flat token rows
        adapters=_routing.INHERIT,                   # None | "name" | [name or None per row] | Routing
        encoder_input_ids: torch.Tensor | None = None,       # encoder-decoder: the source [B, S]
        encoder_attention_mask: torch.Tensor | None = None,  # [B, S]
        memory: Memory | None = None,                # encoder-decoder: the source already encoded
    ) -> ModelOutput:
        """Padded ([B, T] inputs and mask) or packed ([N] streams and a Packed layout) execution;
        both give the same numbers. Sequence-level heads return [B, ...] either way; token-level
        heads return [B, T, ...] padded and [N, ...] packed. `positions` (rows of the flattened
        [B*T] or [N] tokens) limits the LM heads to the tokens that are scored, e.g. the masked
        ones in MLM pre-training, which skips most of the vocabulary-sized matmul.

        `adapters`: None runs the base model; a name runs that adapter (and its head) on every row; a
        list gives each row its adapter (None: the base model), all in this one forward pass. Left
        out, the routing of an enclosing `routing.using(...)` block applies (default: none).

        An encoder-decoder's input_ids are the decoder's (the target so far, from the decoder start
        token); the source comes as encoder_input_ids (+ mask), or encoded once (`encode`) as memory."""
        B = packed.batch_size if packed is not None else input_ids.shape[0]
        r = _routing.current() if adapters is _routing.INHERIT else _routing.Routing.of(adapters, B)
        if r.mixed and len(r.per_row) != B:
            raise ValueError(f"the routing names {len(r.per_row)} rows but the batch has {B}")
        self.check_routing(r)
        r = r.with_tokens(packed.seq_ids if packed is not None else None)
        with _routing.using(r):
            if self.encoder is not None:
                if memory is None:
                    if encoder_input_ids is None:
                        raise ValueError("an encoder-decoder needs its source: encoder_input_ids (or memory=encode(...))")
                    memory = self.encode(encoder_input_ids, encoder_attention_mask)
                if memory.batch_size != B:
                    raise ValueError(f"the source has {memory.batch_size} rows but the decoder batch {B}")
            elif memory is not None or encoder_input_ids is not None:
                raise ValueError(f"a {self.config.model_type} model has no encoder: it takes no source or memory")
            h = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, cache, packed, memory)
            out = ModelOutput(hidden_states=h)
            if self.transformer.pooler is not None:
                out.pooled = self.transformer.pool(h, packed)
            self._heads(out, h, r, attention_mask, packed, positions)
        return out

    def _heads(self, out: ModelOutput, h, r, attention_mask, packed, positions) -> None:
        kind, groups = self._head_groups(r)
        if kind is None or groups[0][0] is None:
            return
        if len(groups) == 1:
            head = groups[0][0]
            embedding = self.transformer.embeddings.word_embeddings.weight
            if kind in ("mlm", "causal-lm", "pretraining"):
                scored = h if positions is None else h.reshape(-1, h.shape[-1]).index_select(0, positions)
                out.logits = head(scored, embedding)
                if kind == "pretraining":
                    out.nsp_logits = head.seq_relationship(out.pooled)
            elif kind == "nsp":
                out.logits = head(out.pooled)
            elif kind == "classification":
                out.logits = head(h, out.pooled, attention_mask, packed)
            elif kind == "token-classification":
                out.logits = head(h)
            elif kind == "scalar":
                out.values, out.logits = head(h, attention_mask, packed)
            return
        # rows with different heads: each group of rows through its own head
        device = h.device
        if kind == "classification":   # the features a classifier reads need no parameters of its own
            feats = groups[0][0].features(h, out.pooled, attention_mask, packed)    # [B, D], computed once
            parts = [(rows, head.classify(feats.index_select(0, torch.tensor(rows, device=device))))
                     for head, rows in groups]
            widths = {p.shape[-1] for _, p in parts}
            if len(widths) == 1:
                logits = feats.new_empty(feats.shape[0], widths.pop())
                for rows, p in parts:
                    logits[rows] = p.to(logits.dtype)
                out.logits = logits
            else:
                rows_out: list = [None] * feats.shape[0]
                for rows, p in parts:
                    for j, i in enumerate(rows):
                        rows_out[i] = p[j]
                out.logits = rows_out
        elif kind == "nsp":
            out.logits = self._by_rows(groups, out.pooled, lambda head, x: head(x))
        else:  # token-level heads: each group's tokens through its head
            lm = kind in ("mlm", "causal-lm", "pretraining")
            embedding = self.transformer.embeddings.word_embeddings.weight
            flat = h.reshape(-1, h.shape[-1]) if packed is None else h
            token_row = (packed.seq_ids if packed is not None
                         else torch.arange(h.shape[0], device=device).repeat_interleave(h.shape[1]))
            if lm and positions is not None:
                flat, token_row = flat.index_select(0, positions), token_row.index_select(0, positions)
            result = None
            for head, rows in groups:
                sel = torch.isin(token_row, torch.tensor(rows, device=device)).nonzero().squeeze(-1)
                x = flat.index_select(0, sel)
                part = head(x, embedding) if lm else head.token_values(x) if kind == "scalar" else head(x)
                if result is None:
                    result = part.new_empty(flat.shape[0], *part.shape[1:])
                elif part.shape[1:] != result.shape[1:]:
                    raise ConfigError(f"{kind} heads of different widths cannot share a batch")
                result[sel] = part
            if packed is None and not (lm and positions is not None):
                result = result.view(*h.shape[:2], *result.shape[1:])
            if kind == "scalar":
                out.values, out.logits = result, groups[0][0].reward(result, attention_mask, packed)
            else:
                out.logits = result
            if kind == "pretraining":
                out.nsp_logits = self._by_rows(groups, out.pooled, lambda head, x: head.seq_relationship(x))

    @staticmethod
    def _by_rows(groups, x: torch.Tensor, fn) -> torch.Tensor:
        """fn(head, rows of x) for each group of rows, put back in row order."""
        out = None
        for head, rows in groups:
            idx = torch.tensor(rows, device=x.device)
            part = fn(head, x.index_select(0, idx))
            if out is None:
                out = part.new_empty(x.shape[0], *part.shape[1:])
            out[idx] = part
        return out

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
