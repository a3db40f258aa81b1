"""The trunk shared by every model: embeddings, a stack of blocks, and (by configuration) a final
norm (GPT-2, Llama, pre-norm variants) or a tanh pooler over the first token (BERT). Rotary
positions (Llama) are not embeddings: the trunk computes each token's rotation once per forward
and every layer's attention applies it to its queries and keys.

An encoder-decoder (the original Transformer) is two trunks of this one class: stack="encoder"
(bidirectional, no word table of its own: it reads the decoder's, passed as `words`, because source
and target share one vocabulary and one embedding matrix) and stack="decoder" (causal, with
cross-attention to the encoder's output in every layer)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.kernels import compute_dtype
from lmforge.models.config import ModelConfig
from lmforge.models.kv_cache import KVCache
from lmforge.models.layers import Block, Dropout, RMSNorm, norm_layer, rotary_angles
from lmforge.models.memory import Memory
from lmforge.models.packing import Packed
from lmforge.models.prefixes import InputPrefix, checked


def sinusoids(n: int, d: int) -> torch.Tensor:
    """[n, d]: sin in the even and cos in the odd columns, wavelengths 2pi .. 10000 * 2pi."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]                          # [n, 1]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))  # [ceil(d/2)]
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return table


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position vectors; `scaled` multiplies them by one trained scalar that starts
    at 1/sqrt(D), so they begin small next to the word embeddings."""

    def __init__(self, n: int, d: int, scaled: bool):
        super().__init__()
        # recomputed on construction, never saved: nothing in a checkpoint to disagree with
        self.register_buffer("table", sinusoids(n, d), persistent=False)
        self.scale = nn.Parameter(torch.tensor(d ** -0.5)) if scaled else None

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.table[position_ids]                                             # [.., D]
        return x if self.scale is None else x * self.scale


class Embeddings(nn.Module):
    """Word + position (+ token type) vectors. own_words=False: no word table here; the caller passes
    the one to read (`words`), so two trunks can share one (an encoder-decoder's source and target)."""

    def __init__(self, config: ModelConfig, own_words: bool = True):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d) if own_words else None
        # Vaswani et al. 3.4: embeddings times sqrt(d_model), next to fixed sinusoids of unit scale
        self.scale = math.sqrt(d) if config.scale_embedding else None
        if config.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        elif config.position_embedding == "rope":
            self.position_embeddings = None   # positions enter in attention (Transformer.rope)
        else:
            self.position_embeddings = SinusoidalPositions(
                config.max_position_embeddings, d, scaled=config.position_embedding == "scaled-sinusoidal")
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, d) if config.type_vocab_size else None
        )
        # BERT normalises the embeddings, GPT-2 does not (Cramming's pre-norm BERT does too)
        self.norm = norm_layer(config) if config.embedding_norm else None
        p = config.hidden_dropout if config.embedding_dropout is None else config.embedding_dropout
        self.dropout = Dropout(p)

    def forward(self, input_ids, position_ids, token_type_ids=None, words: nn.Embedding | None = None):
        words = self.word_embeddings if words is None else words
        if words is None:
            raise ValueError("these embeddings share another trunk's word table: pass it as words=")
        x = words(input_ids)
        if self.scale is not None:
            x = x * self.scale
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


def attention_bias(attention_mask: torch.Tensor, q_len: int, causal: bool,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """An additive mask [B, 1, Tq, S] from a key mask [B, S] (1 = token, 0 = padding).

    Returns None when SDPA needs no mask (no padding, and causality is either absent, trivial for a
    single query, or handled by SDPA's own is_causal), so it can take its fastest path. Masked
    entries get the dtype's most negative finite value rather than -inf: a query row whose keys are
    all padding (left padding in a causal model) then stays finite instead of turning into NaN.
    """
    B, S = attention_mask.shape
    if bool(attention_mask.all()) and (not causal or q_len == 1 or q_len == S):
        return None
    keep = attention_mask.bool()[:, None, None, :]               # [B, 1, 1, S]
    if causal:
        q_pos = torch.arange(S - q_len, S, device=attention_mask.device)[:, None]
        k_pos = torch.arange(S, device=attention_mask.device)[None, :]
        keep = keep & (k_pos <= q_pos)[None, None]                # [B, 1, Tq, S]
    bias = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)


STACKS = (
    "whole",     # the model is this one stack: an encoder (BERT) or a decoder (GPT-2, Llama)
    "encoder",   # an encoder-decoder's encoder: bidirectional, reads the decoder's word table
    "decoder",   # an encoder-decoder's decoder: causal, cross-attention to the encoder's output
)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, stack: str = "whole"):
        super().__init__()
        if stack not in STACKS:
            raise ValueError(f"stack {stack!r} is not one of {STACKS}")
        self.config = config
        self.stack = stack
        self.causal = config.causal or stack == "decoder"
        self.embeddings = Embeddings(config, own_words=stack != "encoder")
        n = config.num_decoder_layers if stack == "decoder" else config.num_layers
        self.layers = nn.ModuleList(Block(config, causal=self.causal, cross_attention=stack == "decoder")
                                    for _ in range(n))
        d = config.hidden_size
        self.final_norm = norm_layer(config) if config.final_norm else None
        self.pooler = nn.Linear(d, d) if config.has_pooler and stack == "whole" else None
        # Prefix-embedding tuning (attach_input_prefix): P virtual-token vectors [P, D], inserted
        # after the first token (encoders keep [CLS] first) or at the start (decoders), and dropped
        # from the output, so heads and callers see their own tokens only.
        self.input_prefix: InputPrefix | None = None

    def attach_input_prefix(self, prefix: InputPrefix) -> InputPrefix:
        """Give the model its virtual-token source (once; later calls return the one attached)."""
        if self.input_prefix is None:
            self.input_prefix = checked(prefix, InputPrefix, "Transformer.attach_input_prefix")
        return self.input_prefix

    def virtual_tokens(self) -> torch.Tensor | None:
        return None if self.input_prefix is None else self.input_prefix()

    def layer_prefix_length(self) -> int:
        """P, the prefix-layer keys per layer the current routing gives (0: none)."""
        for layer in self.layers:
            kv = layer.attention.kv_prefix() if layer.attention.kv_prefix is not None else None
            if kv is not None:
                return kv[0].shape[0]
        return 0

    @property
    def _insert_at(self) -> int:
        return 0 if self.causal else 1

    def position_ids(self, input_ids, attention_mask, past: int) -> torch.Tensor:
        """Positions count tokens, not pads: left- and right-padded batches embed alike."""
        B, T = input_ids.shape
        if attention_mask is None:
            pos = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        return pos + self.config.position_offset

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """Rotary (cos, sin) for positions [B, T] -> [B, 1, T, Dh] (broadcast over heads), or [N] ->
        [N, 1, Dh] on a packed stream; None without rotary positions. dtype: that of the queries and
        keys they rotate (the compute dtype: bf16 under bf16 autocast, where fp32 tables would
        promote every rotated head to fp32 and cast it back, three casts a layer)."""
        c = self.config
        if c.position_embedding != "rope":
            return None
        cos, sin = rotary_angles(position_ids, c.head_dim, c.rope_theta, dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)   # the heads axis: [B, H, T, Dh] and [N, H, Dh] alike

    def forward(
        self,
        input_ids: torch.Tensor,                      # [B, T]
        attention_mask: torch.Tensor | None = None,   # [B, past + T], 1 = token
        token_type_ids: torch.Tensor | None = None,   # [B, T]
        position_ids: torch.Tensor | None = None,     # [B, T]
        cache: KVCache | None = None,
        packed: Packed | None = None,                 # unpadded: input_ids etc. are [N] streams
        memory: Memory | None = None,                 # stack "decoder": the encoder's output
        words: nn.Embedding | None = None,            # stack "encoder": the word table it reads
    ) -> torch.Tensor:
        if (memory is not None) != (self.stack == "decoder"):
            raise ValueError("an encoder-decoder's decoder stack needs the encoder's output (memory=); "
                             "no other stack takes one")
        if packed is not None:
            return self._forward_packed(input_ids, token_type_ids, position_ids, packed, cache, memory, words)
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = self.position_ids(input_ids, attention_mask, past)
        x = self.embeddings(input_ids, position_ids, token_type_ids, words)
        B, T = input_ids.shape
        rope_ids = position_ids
        virtual = self.virtual_tokens()
        if virtual is not None:
            if cache is not None:
                raise ValueError("prefix-embedding tuning decodes with a KV cache in the packed layout "
                                 "(models/generate.py), not the padded one")
            at, P = self._insert_at, virtual.shape[0]
            # [B, T, D] -> [B, at + P + T - at, D]; the virtual tokens are always attended to
            x = torch.cat([x[:, :at], virtual.to(x.dtype).expand(B, -1, -1), x[:, at:]], dim=1)
            if attention_mask is None:
                attention_mask = torch.ones(B, T, dtype=torch.long, device=x.device)
            attention_mask = torch.cat([attention_mask[:, :at], attention_mask.new_ones(B, P),
                                        attention_mask[:, at:]], dim=1)
            T = T + P
            # rotary positions count the virtual tokens too, as the sequence the layers see
            rope_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if attention_mask is None and self.causal and past and T > 1:
            # a chunk after cached tokens needs an explicit causal mask with an offset
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        mask = None
        if attention_mask is not None:
            mask = attention_bias(attention_mask, T, self.causal, x.dtype)
        rope = self.rope(rope_ids, compute_dtype(x))
        x = self._layers(x, mask=mask, cache=cache, rope=rope, memory=memory)      # the final norm included
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if virtual is not None:  # drop the virtual tokens again
            x = torch.cat([x[:, :self._insert_at], x[:, self._insert_at + virtual.shape[0]:]], dim=1)
        return x  # [B, T, D]

    def _layers(self, x: torch.Tensor, **kw) -> torch.Tensor:
        """The layers in turn, then the final norm (if any). Pre-norm layers hand the next layer its
        normed input with their output (Block.forward(chain=True)): the last residual add of one layer and the
        first norm of the next are one pass at inference (kernels.add_norm)."""
        stream = x.dtype
        if not self.config.pre_norm:
            for i, layer in enumerate(self.layers):
                x = layer(x, layer_idx=i, **kw)
            if self.final_norm is not None:
                x = self.final_norm(x)
        else:
            after = [layer.attention_norm for layer in self.layers[1:]] + [self.final_norm]
            h = None
            for i, (layer, next_norm) in enumerate(zip(self.layers, after)):
                x, h = layer(x, layer_idx=i, chain=True, normed=h, next_norm=next_norm, **kw)
            x = x if h is None else h
        return x.to(stream)   # the fused norm hands back its rows in the compute dtype; the output keeps x's

    def _forward_packed(self, input_ids, token_type_ids, position_ids, packed: Packed,
                        cache: KVCache | None = None, memory: Memory | None = None,
                        words: nn.Embedding | None = None) -> torch.Tensor:
        """A packed stream [N]; with a cache, sequence b is cache row b (KVCache.begin: a prefill into
        empty rows, or one token per row whose position is the row's length so far).

        Prefix-embedding tuning (P virtual tokens at the start of each decoder sequence) with a cache:
        the prefill inserts them and caches them as the first P tokens of every row; a decode step
        then inserts nothing, and its token's position embedding counts the real tokens (its slot
        minus P) while its rotary position counts the virtual ones too (its slot), as without a cache."""
        virtual = self.virtual_tokens()
        P = 0 if virtual is None else virtual.shape[0]
        if cache is not None and P and not self.causal:
            raise ValueError("virtual input tokens with a KV cache: only decoders decode")
        offset = self.config.position_offset
        if P and (cache is None or cache.empty):   # insert the virtual tokens (training, or a prefill)
            if position_ids is None:
                position_ids = packed.position_ids + offset
            x = self.embeddings(input_ids, position_ids, token_type_ids, words)    # [N, D]
            x, packed, real = self._insert_packed(x, virtual.to(x.dtype), packed)  # [N + B P, D]
            step = cache.begin(packed) if cache is not None else None
            rope_ids = packed.position_ids  # the longer sequences' own positions
        else:
            step = cache.begin(packed) if cache is not None else None
            # a token's slot counts the virtual tokens (P) and the reserved prefix-layer slots before it
            if position_ids is None:
                position_ids = (packed.position_ids if step is None else step.slots - P - cache.reserved) + offset
            x = self.embeddings(input_ids, position_ids, token_type_ids, words)    # [N, D]
            rope_ids = position_ids if not P else step.slots - cache.reserved
            virtual = None  # cached already: nothing to insert or drop
        rope = self.rope(rope_ids, compute_dtype(x))
        x = self._layers(x, cache=cache, packed=packed, rope=rope, memory=memory)   # the final norm included
        if cache is not None:
            cache.end()
        if virtual is not None:
            x = x.index_select(0, real)                                          # [N, D] again (rows: norm first alike)
        return x  # [N, D]

    def _insert_packed(self, x, virtual, packed: Packed):
        """Insert P virtual tokens into every sequence of a packed stream [N, D] -> [N + B P, D].
        Returns the new stream, its layout, and the rows of the original tokens in it [N]."""
        B, P, at = packed.batch_size, virtual.shape[0], self._insert_at
        longer = Packed(packed.cu_seqlens + P * torch.arange(B + 1, device=x.device), packed.max_len + P)
        pos = packed.position_ids
        real = longer.cu_seqlens[packed.seq_ids] + pos + P * (pos >= at)               # [N]
        slots = (longer.cu_seqlens[:-1, None] + at + torch.arange(P, device=x.device)).reshape(-1)  # [B P]
        out = x.new_zeros(x.shape[0] + B * P, x.shape[1])
        out = out.index_copy(0, real, x).index_copy(0, slots, virtual.repeat(B, 1))
        return out, longer, real

    def pool(self, hidden: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        """BERT's pooled output: tanh(W h_[CLS] + b)."""
        return torch.tanh(self.pooler(first_token(hidden, packed)))


def first_token(hidden: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
    """[B, D]: the first token of each sequence, padded [B, T, D] or packed [N, D]."""
    return hidden[:, 0] if packed is None else hidden.index_select(0, packed.first)


def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """BERT/GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms and RMSNorms."""
    std = config.initializer_range
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            # GPT-2 scales the projections into the residual stream by 1/sqrt(2 * layers).
            scaled = config.pre_norm and name.endswith("output")  # attention.output, ffn output
            nn.init.normal_(m.weight, 0.0, std / math.sqrt(2 * config.num_layers) if scaled else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            # embeddings scaled by sqrt(D) start at std D^-1/2 (as fairseq's Transformer): unit scale
            # once scaled, and as the tied output matrix, unit-variance logits
            scaled = config.scale_embedding and name.endswith("word_embeddings")
            nn.init.normal_(m.weight, 0.0, config.hidden_size ** -0.5 if scaled else std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
