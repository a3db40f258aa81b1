"""The Transformer block: multi-head self-attention and a feed-forward network, post- or pre-norm.
Also the pieces Llama adds as configuration: RMSNorm, rotary positions (applied to queries and keys
inside attention) and grouped-query attention (fewer key/value heads than query heads).

Module names follow BERT's checkpoints (query/key/value, attention.output, intermediate, output) so
that a checkpoint key map is a rename, and so that adapters can target the same names PEFT users know.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.config import ModelConfig
from lmforge.models.kv_cache import KVCache
from lmforge import kernels
from lmforge.kernels import RMSNormBase, add_norm, attend, keep_mask
from lmforge.kernels.rotary import rotate, rotate_stream   # the formula, beside its fused form
from lmforge.models.linear import Linear
from lmforge.models.memory import Memory
from lmforge.models.packing import Packed
from lmforge.models.prefixes import AttentionPrefix, checked


def activation(name: str):
    if name == "gelu":
        return F.gelu  # BERT: the exact erf form
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")  # GPT-2's tanh approximation
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu  # x * sigmoid(x): Llama's gate (SwiGLU)
    raise ValueError(name)


class RMSNorm(RMSNormBase):
    """x / sqrt(mean(x^2) + eps) * weight: a LayerNorm without centring and without bias (Llama).
    The statistics are taken in float32 whatever the input dtype: a mean of bf16 squares is too coarse."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()                                                      # no copy when x is fp32
        # in place on the [.., 1] statistics only. Not F.rms_norm: the same result bit for bit, but in
        # torch 2.13 on a CPU it took 3x this at 800 rows (1.1 against 0.38 ms: a prefill, a batch)
        r = h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()        # [.., 1]
        return self.weight * (h * r).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def norm_layer(config: ModelConfig, d: int | None = None) -> nn.Module:
    """The trunk's normalisation of width d (default: hidden_size), as config.norm says."""
    d = config.hidden_size if d is None else d
    if config.norm == "rmsnorm":
        return RMSNorm(d, config.layer_norm_eps)
    return nn.LayerNorm(d, eps=config.layer_norm_eps)


def rotary_angles(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(cos, sin), each [*position_ids.shape, Dh]: the rotation of every position (Su et al. 2021).

    Coordinate i of a head is paired with i + Dh/2 (the two halves of the head, Hugging Face Llama's
    convention; llama.cpp pairs neighbours, and models/gguf.py reorders its rows on load), and the pair
    is rotated by position * theta^(-2i/Dh). Angles are computed in float32 from scratch each call: a
    table cast to bf16 with the model would lose the precision large positions need."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    angles = position_ids[..., None].float() * inv_freq                # [.., Dh/2]
    angles = torch.cat([angles, angles], dim=-1)                        # [.., Dh]: both halves alike
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Dropout(nn.Module):
    """nn.Dropout's semantics (zero with probability p, scale the rest by 1/(1-p)) with a faster
    mask (keep_mask). Dropout masks were a fifth of a LoRA training step's time with nn.Dropout."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_mask(x, self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head attention: self-attention (forward), or cross-attention from a decoder's tokens to
    an encoder's output (cross). causal: each query sees the keys up to its own position only
    (default: as the config's model is a decoder; an encoder-decoder's decoder stack says so itself)."""

    def __init__(self, config: ModelConfig, causal: bool | None = None):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads  # fewer than num_heads: grouped-query attention
        self.head_dim = config.head_dim
        self.causal = config.causal if causal is None else causal
        self.dropout_p = config.attention_dropout
        bias = config.linear_bias
        inner, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.query = Linear(d, inner, bias=bias)
        self.key = Linear(d, kv, bias=bias)
        self.value = Linear(d, kv, bias=bias)
        self.output = Linear(inner, d, bias=bias)
        # Prefix-layer tuning (attach_prefix): keys and values [P, Hkv Dh] every query may attend to.
        self.kv_prefix: AttentionPrefix | None = None

    def attach_prefix(self, prefix: AttentionPrefix) -> AttentionPrefix:
        """Give this layer its prefix source (once; later calls return the one attached)."""
        if self.kv_prefix is None:
            self.kv_prefix = checked(prefix, AttentionPrefix, "Attention.attach_prefix")
        return self.kv_prefix

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[.., (H + 2 Hkv) Dh] = cat(Q(x), K(x), V(x)), as one GEMM where the kernels can."""
        return kernels.stacked_linear(x, (self.query, self.key, self.value))

    def _prefix(self, B: int):
        """Trainable prefix keys and values [B, Hkv, P, Dh], or None."""
        if self.kv_prefix is None:
            return None
        kv = self.kv_prefix()
        if kv is None:
            return None
        k, v = (t.view(1, -1, self.num_kv_heads, self.head_dim).transpose(1, 2).expand(B, -1, -1, -1) for t in kv)
        return k, v

    def _shared(self, t: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, S, Dh] -> [B, H, S, Dh]: each key/value head repeated for the query heads of its
        group (query head h reads key/value head h // (H / Hkv)). Only the attention call sees the
        copies; the cache keeps Hkv heads."""
        group = self.num_heads // self.num_kv_heads
        if group == 1:
            return t
        B, Hkv, S, Dh = t.shape
        return t[:, :, None].expand(B, Hkv, group, S, Dh).reshape(B, Hkv * group, S, Dh)

    def forward(
        self,
        x: torch.Tensor,                 # [B, T, D]
        mask: torch.Tensor | None,       # additive [B, 1, T, S] or None
        cache: KVCache | None = None,
        layer_idx: int = 0,
        packed: Packed | None = None,    # x is a packed stream [N, D]
        residual: torch.Tensor | None = None,  # added to the output (fused into its GEMM at inference)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # rotary (cos, sin) [B, 1, T, Dh]; packed [N, 1, Dh]
    ) -> torch.Tensor:
        if packed is not None:
            return self._forward_packed(x, packed, residual, rope, cache, layer_idx)
        B, T, _ = x.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        # [B, T, H Dh] -> [B, H, T, Dh]; keys and values with their own Hkv heads
        q = self.query(x).view(B, T, H, Dh).transpose(1, 2)
        k = self.key(x).view(B, T, Hkv, Dh).transpose(1, 2)
        v = self.value(x).view(B, T, Hkv, Dh).transpose(1, 2)
        if rope is not None:  # before the cache: cached keys keep the rotation of their own position
            q, k = rotate(q, *rope), rotate(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer_idx, k, v)  # [B, Hkv, past + T, Dh]
        prefix = self._prefix(B)
        if prefix is not None:
            P = prefix[0].shape[2]
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # [B, Hkv, P + S, Dh]
            if mask is None and self.causal and T > 1:
                S = past + T
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)[None, None]
            if mask is not None:  # prefix keys are visible to every query
                visible = torch.ones(*mask.shape[:-1], P, dtype=mask.dtype, device=mask.device)
                mask = torch.cat([visible if mask.dtype == torch.bool else visible.zero_(), mask], dim=-1)
        # With no padding and no past, SDPA's own causal path avoids materialising a mask.
        is_causal = self.causal and mask is None and past == 0 and T > 1
        y = attend(q, self._shared(k), self._shared(v), mask, self.dropout_p if self.training else 0.0, is_causal)
        y = y.transpose(1, 2).reshape(B, T, H * Dh)  # [B, H, T, Dh] -> [B, T, H Dh]
        return self._project(y, residual)

    def _project(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.output(y) if residual is None else kernels.linear_add(y, self.output, residual)

    def _forward_packed(self, x: torch.Tensor, packed: Packed, residual: torch.Tensor | None = None,
                        rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None,
                        layer_idx: int = 0) -> torch.Tensor:
        """x [N, D]: projections on the real tokens only; attention per length bucket, each padded
        to its own longest sequence (models/packing.py). With a cache (cache.step says where each
        token goes): a prefill stores the prompts' keys and values and attends as without it; a
        decode step (one token per sequence) attends to its own row of the cache."""
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._qkv(x)                                                          # [N, W = (H + 2 Hkv) Dh]
        N = qkv.shape[0]
        target = cache.write_target(layer_idx) if cache is not None else None
        # at inference one compiled pass can do both steps below, in place (kernels/rotary.py)
        if not kernels.rotate_store(qkv, rope, H, Hkv, target):
            if rope is not None:  # on the stream, where each token's position is its own
                qkv = rotate_stream(qkv, rope, H, Hkv)
            if cache is not None:
                _, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
                cache.write(layer_idx, k.view(N, Hkv, Dh), v.view(N, Hkv, Dh))     # rotated keys: as used
        if cache is not None:
            q = qkv[:, :H * Dh]
            if cache.step.prefill and cache.reserved:   # this layer's prefix, once, before every row's tokens
                prefix = self._prefix(1)                                            # [1, Hkv, P, Dh] twice
                cache.write_reserved(layer_idx, prefix[0][0], prefix[1][0])
            if not cache.step.prefill:
                return self._project(self._attend_cached(q, cache, layer_idx), residual)
        drop = self.dropout_p if self.training else 0.0
        if not drop and self.kv_prefix is None:   # inference: straight on the stream where a kernel can
            q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
            y = kernels.packed_attention(q, k, v, packed.cu_seqlens, packed.max_len, H, Hkv, self.causal)
            if y is not None:
                return self._project(y, residual)                                  # [N, D]
        W = qkv.shape[1]
        dense = packed.dense  # the stream is the layout already: no scatter, no gather
        if dense:
            rows = qkv
        else:  # gather into the bucketed layout [R, W] (padding rows repeat a real token: masked)
            rows = qkv.index_select(0, packed.attn_source)
        outs = []
        # split, not one slice per group: its backward is one concatenation of the groups' gradients,
        # where each slice's would zero-fill a buffer of all the rows
        blocks = rows.split([g.n * g.T for g in packed.groups]) if len(packed.groups) > 1 else (rows,)
        for g, block in zip(packed.groups, blocks):
            # rows of group g [n T, W] -> [n, T, H + 2 Hkv, Dh] -> [n, H + 2 Hkv, T, Dh] -> q, k, v
            block = block.view(g.n, g.T, H + 2 * Hkv, Dh).transpose(1, 2)
            q, k, v = block.split([H, Hkv, Hkv], dim=1)
            prefix = self._prefix(g.n)
            if prefix is not None:
                k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # [n, Hkv, P + T, Dh]
            mask = packed.group_mask(g, self.causal, 0 if prefix is None else prefix[0].shape[2])
            y = attend(q, self._shared(k), self._shared(v), mask, drop)          # [n, H, T, Dh]
            outs.append(y.transpose(1, 2).reshape(g.n * g.T, H * Dh))
        y = outs[0] if len(outs) == 1 else torch.cat(outs)                       # [rows, H Dh]
        return self._project(y if dense else y.index_select(0, packed.attn_index), residual)  # [N, D]

    def _attend_cached(self, q: torch.Tensor, cache: KVCache, layer_idx: int) -> torch.Tensor:
        """A decode step: the new token of each sequence, q [B, H Dh], attends to its own cache row
        (its own past, this token included) -> [B, H Dh]."""
        B, H, Hkv, Dh = q.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        k, v = cache.keys(layer_idx)                        # [B, Hkv, S, Dh] twice
        keep = cache.step.key_bias(q.dtype)                 # [B, 1, 1, S] additive
        prefix = None if cache.reserved else self._prefix(B)   # reserved: in the cache already
        if prefix is not None:                              # prefix keys are visible to every query
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
            keep = torch.cat([keep.new_zeros(B, 1, 1, prefix[0].shape[2]), keep], dim=-1)
        # The H / Hkv query heads of a group read one key/value head: as that many queries of it
        # ([B, H Dh] -> [B, Hkv, H / Hkv, Dh]; query head h is in group h // (H / Hkv)), attention
        # reads each cached key once, with none of the copies _shared makes.
        q = q.reshape(B, Hkv, H // Hkv, Dh)
        y = attend(q, k, v, keep, self.dropout_p if self.training else 0.0)   # [B, Hkv, H / Hkv, Dh]
        return y.reshape(B, H * Dh)

    def cross(self, x: torch.Tensor, memory: Memory, layer_idx: int, packed: Packed | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention: queries from x [B, T, D] (or a packed stream [N, D] whose sequence b is
        memory row b) to keys and values of the encoder's output, made once per layer (Memory)."""
        H, Dh = self.num_heads, self.head_dim
        k, v = memory.keys_values(layer_idx, self._memory_kv)                  # [B, Hkv, S, Dh] twice
        q = self.query(x)                                                      # [B, T, H Dh] or [N, H Dh]
        if packed is None:
            B, T = q.shape[:2]
        else:  # the stream into a padded [B, T] grid (a decode step: one token per row, T = 1)
            B, T = packed.batch_size, packed.max_len
            if packed.num_tokens != B * T:
                q = q.new_zeros(B * T, H * Dh).index_copy(0, packed.pad_index, q)
        q = q.reshape(B, T, H, Dh).transpose(1, 2)                             # [B, H, T, Dh]
        y = attend(q, self._shared(k), self._shared(v), memory.bias(q.dtype), self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B * T, H * Dh) if packed is not None else y.transpose(1, 2).reshape(B, T, H * Dh)
        if packed is not None and packed.num_tokens != B * T:
            y = y.index_select(0, packed.pad_index)                            # [N, H Dh]
        return self._project(y, residual)

    def _memory_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output [B, S, D] -> this layer's keys and values [B, Hkv, S, Dh]."""
        B, S, _ = states.shape
        k = self.key(states).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.value(states).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v


class Block(nn.Module):
    """One layer. BERT (post-norm): x = LN(x + f(x)). GPT-2, Llama (pre-norm): x = x + f(LN(x)),
    LN being a LayerNorm or an RMSNorm (config.norm).

    An encoder-decoder's decoder layer (cross_attention=True) has a third sublayer between the two,
    in the same style: cross-attention from its tokens to the encoder's output (the Memory).

    The FFN is out(act(in(x))), or gated (config.ffn == "glu"): `intermediate` computes the gate
    and the up projection as one [2I, D] matrix, and out(act(gate) * up); Llama's SwiGLU is this with
    SiLU (its gate_proj and up_proj are the two halves of `intermediate`)."""

    def __init__(self, config: ModelConfig, causal: bool | None = None, cross_attention: bool = False):
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.linear_bias
        self.pre_norm = config.pre_norm
        self.gated = config.ffn == "glu"
        self.attention = Attention(config, causal)
        self.attention_norm = norm_layer(config)
        self.crossattention = Attention(config, causal=False) if cross_attention else None
        self.crossattention_norm = norm_layer(config) if cross_attention else None
        self.intermediate = Linear(d, 2 * i if self.gated else i, bias=bias)
        self.output = Linear(i, d, bias=bias)
        self.ffn_norm = norm_layer(config)
        self.act_name = config.hidden_act
        self.act = activation(config.hidden_act)
        self.dropout = Dropout(config.hidden_dropout)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(in(x)), or act(gate) * up; at inference the activation can be the post-op of the GEMM
        (kernels.linear_act), except gated, where it reads half of the GEMM's output."""
        if self.gated:
            gate, up = self.intermediate(x).chunk(2, dim=-1)   # [.., 2I] -> [.., I] twice
            return self.act(gate) * up
        return kernels.linear_act(x, self.intermediate, self.act_name, self.act)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self._hidden(x))

    def ffn_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + dropout(ffn(x)); at inference the add can be the post-op of the last GEMM
        (kernels.linear_add)."""
        if self.training and self.dropout.p > 0:
            return residual + self.dropout(self.ffn(x))
        return kernels.linear_add(self._hidden(x), self.output, residual)

    def forward(self, x, mask=None, cache: KVCache | None = None, layer_idx: int = 0,
                packed: Packed | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                memory: Memory | None = None, chain: bool = False, normed: torch.Tensor | None = None,
                next_norm: nn.Module | None = None):
        """The layer's output; chain=True (pre-norm only): (output, next_norm(output) or None), taking
        normed = attention_norm(x) from the layer before when it made it (see chained). Called through
        the module (not chained directly), so hooks such as FSDP's gathering of the layer's weights run."""
        if not self.pre_norm:   # post-norm: x = norm(x + dropout(f(x))) after each sublayer
            if chain:
                raise ValueError("only pre-norm layers chain their norms")
            for norm, f in self._sublayers(mask, cache, layer_idx, packed, rope, memory):
                x = add_norm(self.dropout(f(x)), x, norm)[0]
            return x
        out = self.chained(x, normed, next_norm, mask, cache, layer_idx, packed, rope, memory)
        return out if chain else out[0]

    def chained(self, x, normed: torch.Tensor | None, next_norm: nn.Module | None, mask=None,
                cache: KVCache | None = None, layer_idx: int = 0, packed: Packed | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, memory: Memory | None = None):
        """A pre-norm layer, x = x + dropout(f(norm(x))) for each sublayer f, each sum made in one pass
        with the norm after it (kernels.add_norm). normed: attention_norm(x) when the layer before made it
        so; next_norm: the norm the next layer (or the trunk's final norm) applies to this layer's output.
        Returns (output, next_norm(output)), or (output, None) without a next_norm."""
        sublayers = self._sublayers(mask, cache, layer_idx, packed, rope, memory)
        h = self.attention_norm(x) if normed is None else normed
        for (_, f), (norm_after, _) in zip(sublayers, sublayers[1:]):
            h, x = add_norm(self.dropout(f(h)), x, norm_after, with_sum=True)
        if next_norm is None:
            return self.ffn_residual(h, x), None
        h, x = add_norm(self.dropout(self.ffn(h)), x, next_norm, with_sum=True)
        return x, h

    def _sublayers(self, mask, cache, layer_idx, packed, rope, memory) -> list:
        """[(norm, sublayer)] in order: attention, cross-attention (a decoder of an encoder-decoder),
        the FFN."""
        if (memory is None) != (self.crossattention is None):
            raise ValueError("a decoder layer with cross-attention needs the encoder's output (memory=), "
                             "and only such a layer takes one")
        out = [(self.attention_norm, lambda h: self.attention(h, mask, cache, layer_idx, packed, rope=rope))]
        if memory is not None:
            out.append((self.crossattention_norm, lambda h: self.crossattention.cross(h, memory, layer_idx, packed)))
        return out + [(self.ffn_norm, self.ffn)]
