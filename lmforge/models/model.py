"""A model = the trunk + one head, configured by one ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.models.config import ModelConfig
from lmforge.models.heads import build_head
from lmforge.models.kv_cache import KVCache
from lmforge.models.packing import Packed
from lmforge.models.transformer import Transformer, init_weights


@dataclass
class ModelOutput:
    hidden_states: torch.Tensor                 # [B, T, D] last layer ([N, D] when packed)
    logits: torch.Tensor | None = None          # head output: [B, C], [B, T, C], [B, T, V] or [B] (scalar)
    pooled: torch.Tensor | None = None          # BERT pooler output [B, D]
    nsp_logits: torch.Tensor | None = None      # [B, 2] (pretraining head)
    values: torch.Tensor | None = None          # [B, T] (scalar head)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.head = build_head(config)
        init_weights(self, config)

    @property
    def device(self) -> torch.device:
        return self.transformer.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embeddings.word_embeddings.weight.dtype

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache.for_model(self.config, batch_size, max_length, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,                     # [B, T], or [N] with packed
        attention_mask: torch.Tensor | None = None,  # [B, past + T]; unused with packed
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        packed: Packed | None = None,                # unpadded batch: see models/packing.py
        positions: torch.Tensor | None = None,       # LM heads: score only these flat token rows
    ) -> ModelOutput:
        """Padded ([B, T] inputs and mask) or packed ([N] streams and a Packed layout) execution;
        both give the same numbers. Sequence-level heads return [B, ...] either way; token-level
        heads return [B, T, ...] padded and [N, ...] packed. `positions` (rows of the flattened
        [B*T] or [N] tokens) limits the LM heads to the tokens that are scored, e.g. the masked
        ones in MLM pre-training, which skips most of the vocabulary-sized matmul."""
        h = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, cache, packed)
        out = ModelOutput(hidden_states=h)
        if self.transformer.pooler is not None:
            out.pooled = self.transformer.pool(h, packed)
        head, kind = self.head, self.config.head
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
        return out

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
