"""The Transformer block: multi-head self-attention and a feed-forward network, post- or pre-LayerNorm.

Module names follow BERT's checkpoints (query/key/value, attention.output, intermediate, output) so
that a checkpoint key map is a rename, and so that adapters can target the same names PEFT users know.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.config import ModelConfig
from lmforge.models.kv_cache import KVCache
from lmforge.models.linear import Linear, concat_linear, fused_linear, lowrank_concat_linear
from lmforge.models.packing import Packed


def activation(name: str):
    if name == "gelu":
        return F.gelu  # BERT: the exact erf form
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")  # GPT-2's tanh approximation
    if name == "relu":
        return F.relu
    raise ValueError(name)


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean mask shaped like `like`, True with probability 1 - p. On CPUs it is cut from 64-bit
    random words, four 16-bit lanes each (a full-range random_ fills all 64 bits; the default range
    gives 63): several times faster than bernoulli or uniform sampling per element. p is rounded to a
    multiple of 1/65536. Elsewhere it is torch's own uniform sampling."""
    if like.device.type != "cpu":
        return torch.rand_like(like) >= p
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)
    keep = words.view(torch.int16) >= -32768 + round(p * 65536)       # uniform over int16, contiguous
    return keep[:n].view(like.shape)


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


def attend(q, k, v, mask: torch.Tensor | None, dropout_p: float, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over [B, H, T, Dh]. With dropout, the probabilities are
    dropped with keep_mask (SDPA's CPU path would fall back to the same math with slower sampling);
    without, SDPA picks its fused kernel. mask: boolean keep-mask or additive, broadcastable."""
    if dropout_p == 0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)              # [B, H, T, S]
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    probs = scores.softmax(-1)
    probs = probs * keep_mask(probs, dropout_p).to(probs.dtype).mul_(1.0 / (1.0 - dropout_p))
    return probs @ v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.causal = config.causal
        self.dropout_p = config.attention_dropout
        self.query = Linear(d, d)
        self.key = Linear(d, d)
        self.value = Linear(d, d)
        self.output = Linear(d, d)
        # Prefix-layer tuning plugs in here: a module returning (keys, values) [P, D] that every
        # query may attend to (adapters/prefix.py). None: plain attention.
        self.kv_prefix: nn.Module | None = None
        # (module computing [.., 3D], (query, key, value) it was built from): a one-GEMM Q/K/V for
        # inference (infer/quantize.py builds an int8 one). Used only while those three are in place.
        self.fused_qkv: tuple | None = None

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[.., 3D] = Q, K, V projections of x, as one GEMM where possible."""
        if self.fused_qkv is not None:
            fused, sources = self.fused_qkv
            if all(a is b for a, b in zip(sources, (self.query, self.key, self.value))):
                return fused(x)
        qkv = concat_linear(x, (self.query, self.key, self.value))
        if qkv is None:  # training with the projections frozen (LoRA, prefix tuning)
            qkv = lowrank_concat_linear(x, (self.query, self.key, self.value))
        if qkv is None:  # training them, a mixed-adapter batch, another device
            qkv = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)
        return qkv

    def _prefix(self, B: int):
        """Trainable prefix keys and values [B, H, P, Dh], or None."""
        if self.kv_prefix is None:
            return None
        kv = self.kv_prefix()
        if kv is None:
            return None
        k, v = (t.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(B, -1, -1, -1) for t in kv)
        return k, v

    def forward(
        self,
        x: torch.Tensor,                 # [B, T, D]
        mask: torch.Tensor | None,       # additive [B, 1, T, S] or None
        cache: KVCache | None = None,
        layer_idx: int = 0,
        packed: Packed | None = None,    # x is a packed stream [N, D]
        residual: torch.Tensor | None = None,  # added to the output (fused into its GEMM at inference)
    ) -> torch.Tensor:
        if packed is not None:
            return self._forward_packed(x, packed, residual)
        B, T, D = x.shape
        # [B, T, D] -> [B, H, T, Dh]
        q = self.query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer_idx, k, v)  # [B, H, past + T, Dh]
        prefix = self._prefix(B)
        if prefix is not None:
            P = prefix[0].shape[2]
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # [B, H, P + S, Dh]
            if mask is None and self.causal and T > 1:
                S = past + T
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)[None, None]
            if mask is not None:  # prefix keys are visible to every query
                visible = torch.ones(*mask.shape[:-1], P, dtype=mask.dtype, device=mask.device)
                mask = torch.cat([visible if mask.dtype == torch.bool else visible.zero_(), mask], dim=-1)
        # With no padding and no past, SDPA's own causal path avoids materialising a mask.
        is_causal = self.causal and mask is None and past == 0 and T > 1
        y = attend(q, k, v, mask, self.dropout_p if self.training else 0.0, is_causal)
        y = y.transpose(1, 2).reshape(B, T, D)  # [B, H, T, Dh] -> [B, T, D]
        return self._project(y, residual)

    def _project(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if residual is None:
            return self.output(y)
        out = fused_linear(y, self.output, add=residual)
        return out if out is not None else residual + self.output(y)

    def _forward_packed(self, x: torch.Tensor, packed: Packed, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, D]: projections on the real tokens only; attention per length bucket, each padded
        to its own longest sequence (models/packing.py)."""
        N, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        qkv = self._qkv(x)                                                          # [N, 3D]
        dense = packed.dense  # the stream is the layout already: no scatter, no gather
        if dense:
            rows = qkv
        else:  # scatter into the bucketed layout [R, 3D]; only the padding rows need zeros
            rows = qkv.new_empty(packed.attn_rows, 3 * D).index_copy_(0, packed.attn_index, qkv)
            rows.index_fill_(0, packed.attn_pad_rows, 0.0)
        drop = self.dropout_p if self.training else 0.0
        outs = []
        # split, not one slice per group: its backward is one concatenation of the groups' gradients,
        # where each slice's would zero-fill a buffer of all the rows
        blocks = rows.split([g.n * g.T for g in packed.groups]) if len(packed.groups) > 1 else (rows,)
        for g, block in zip(packed.groups, blocks):
            # rows of group g [n T, 3D] -> [n, T, 3, H, Dh] -> [3, n, H, T, Dh]
            block = block.view(g.n, g.T, 3, H, Dh)
            q, k, v = block.permute(2, 0, 3, 1, 4).unbind(0)
            prefix = self._prefix(g.n)
            if prefix is not None:
                k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # [n, H, P + T, Dh]
            mask = packed.group_mask(g, self.causal, 0 if prefix is None else prefix[0].shape[2])
            y = attend(q, k, v, mask, drop)                                      # [n, H, T, Dh]
            outs.append(y.transpose(1, 2).reshape(g.n * g.T, D))
        y = outs[0] if len(outs) == 1 else torch.cat(outs)                       # [rows, D]
        return self._project(y if dense else y.index_select(0, packed.attn_index), residual)  # [N, D]


class Block(nn.Module):
    """One layer. BERT (post-norm): x = LN(x + f(x)). GPT-2 (pre-norm): x = x + f(LN(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.pre_norm = config.pre_norm
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(d, eps=eps)
        self.intermediate = Linear(d, config.intermediate_size)
        self.output = Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
        self.act_name = config.hidden_act
        self.act = activation(config.hidden_act)
        self.dropout = Dropout(config.hidden_dropout)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.act(self.intermediate(x)))

    def attention_residual(self, h, residual, mask, cache, layer_idx, packed) -> torch.Tensor:
        """residual + dropout(attention(h)); without dropout the output GEMM adds the residual itself."""
        if self.training and self.dropout.p > 0:
            return residual + self.dropout(self.attention(h, mask, cache, layer_idx, packed))
        return self.attention(h, mask, cache, layer_idx, packed, residual=residual)

    def ffn_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + dropout(ffn(x)); at inference two GEMMs whose activation and residual add are
        oneDNN post-ops (no separate passes over the [N, 4D] and [N, D] outputs)."""
        if not (self.training and self.dropout.p > 0):
            h = fused_linear(x, self.intermediate, act=self.act_name)
            if h is not None:
                y = fused_linear(h, self.output, add=residual)
                return y if y is not None else residual + self.output(h)
        return residual + self.dropout(self.ffn(x))

    def forward(self, x, mask=None, cache: KVCache | None = None, layer_idx: int = 0,
                packed: Packed | None = None):
        if self.pre_norm:
            x = self.attention_residual(self.attention_norm(x), x, mask, cache, layer_idx, packed)
            return self.ffn_residual(self.ffn_norm(x), x)
        x = self.attention_norm(self.attention_residual(x, x, mask, cache, layer_idx, packed))
        return self.ffn_norm(self.ffn_residual(x, x))
