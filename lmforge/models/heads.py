"""Task heads. Each takes the trunk's hidden states [B, T, D] (and what else it needs) to logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.models.config import ModelConfig
from lmforge.models.layers import Dropout, activation
from lmforge.models.packing import Packed
from lmforge.models.transformer import first_token


def last_token_index(attention_mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """Index of the last real token of each row [B]: works for right and left padding alike."""
    if attention_mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    mask = attention_mask[:, -T:].long()
    return (torch.arange(T, device=device) * mask).argmax(-1)


def last_token(hidden: torch.Tensor, attention_mask, packed: Packed | None = None) -> torch.Tensor:
    """[B, D]: the last real token of each sequence, padded [B, T, D] or packed [N, D]."""
    if packed is not None:
        return hidden.index_select(0, packed.last)
    B, T, _ = hidden.shape
    idx = last_token_index(attention_mask, B, T, hidden.device)
    return hidden[torch.arange(B, device=hidden.device), idx]


class MaskedLMHead(nn.Module):
    """BERT cls.predictions / RoBERTa lm_head: dense -> act -> LayerNorm -> decoder + bias, the
    decoder being the input embedding matrix (tied) or a matrix of its own. With nsp=True it also
    holds BERT's next-sentence classifier (BertForPreTraining)."""

    def __init__(self, config: ModelConfig, nsp: bool = False):
        super().__init__()
        d = config.hidden_size
        self.transform = nn.Linear(d, d, bias=config.linear_bias)
        self.act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.decoder = None if config.tie_word_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.seq_relationship = nn.Linear(d, 2) if nsp else None

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """hidden [M, D] (or [B, T, D]) -> logits [M, V]. Callers pass only the positions they score
        (Model.forward's `positions`, e.g. the masked ones): the vocabulary matmul is most of the
        head's cost, and MLM scores about 15% of the tokens."""
        weight = embedding_weight if self.decoder is None else self.decoder.weight
        return F.linear(self.norm(self.act(self.transform(hidden))), weight, self.bias)


class NextSentenceHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.seq_relationship(pooled)


class ClassificationHead(nn.Module):
    """Sequence classification (num_labels > 1) or regression (num_labels == 1).

    BERT: dropout(pooler output) -> out_proj. RoBERTa: first token -> dropout -> dense -> tanh ->
    dropout -> out_proj. Decoders (GPT-2, Llama): out_proj (no bias) at the last real token.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.model_type = config.model_type
        self.causal = config.causal
        p = config.hidden_dropout if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = Dropout(p)
        self.dense = nn.Linear(d, d) if config.model_type == "roberta" else None
        self.out_proj = nn.Linear(d, config.num_labels, bias=not config.causal)

    def features(self, hidden, pooled, attention_mask, packed: Packed | None = None) -> torch.Tensor:
        """[B, D]: what the head reads (no parameters of its own): the pooler output (BERT), the first
        token (RoBERTa) or the last real token (GPT-2). Heads of one base read the same features,
        so a batch whose rows use different heads computes them once."""
        if self.model_type == "bert":
            return pooled
        if self.model_type == "roberta":
            return first_token(hidden, packed)
        return last_token(hidden, attention_mask, packed)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, num_labels] from features [B, D]."""
        if self.model_type == "roberta":
            x = torch.tanh(self.dense(self.dropout(x)))
        elif self.causal:
            return self.out_proj(x)
        return self.out_proj(self.dropout(x))

    def forward(self, hidden, pooled, attention_mask, packed: Packed | None = None) -> torch.Tensor:
        return self.classify(self.features(hidden, pooled, attention_mask, packed))


class TokenClassificationHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        p = config.hidden_dropout if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = Dropout(p)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(hidden))  # [B, T, num_labels]


class CausalLMHead(nn.Module):
    """Next-token logits with the input embedding matrix (GPT-2 ties them), or an own matrix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.decoder = (
            None if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        weight = embedding_weight if self.decoder is None else self.decoder.weight
        # through the kernel chosen for this machine: the vocabulary projection is the biggest GEMM of
        # a decode step (SmolLM2: [16, 576] x [576, 49152] took half the time packed on the AMX Xeon)
        return kernels.linear(hidden, weight, None)


class ScalarHead(nn.Module):
    """A scalar per token (values for PPO) and per sequence (rewards): the value at the last real
    token for decoders, at the first token for encoders."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.causal = config.causal
        self.out_proj = nn.Linear(config.hidden_size, 1, bias=not config.causal)

    def token_values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(hidden).squeeze(-1)    # [B, T] (packed: [N]); any rows of tokens

    def reward(self, values: torch.Tensor, attention_mask, packed: Packed | None = None) -> torch.Tensor:
        """[B]: the value at each sequence's last (decoders) or first (encoders) token."""
        pick = last_token if self.causal else (lambda h, m, p: first_token(h, p))
        return pick(values.unsqueeze(-1), attention_mask, packed).squeeze(-1)

    def forward(self, hidden, attention_mask, packed: Packed | None = None):
        values = self.token_values(hidden)
        return values, self.reward(values, attention_mask, packed)


def build_head(config: ModelConfig) -> nn.Module | None:
    return {
        None: lambda c: None,
        "mlm": MaskedLMHead,
        "pretraining": lambda c: MaskedLMHead(c, nsp=True),
        "nsp": NextSentenceHead,
        "classification": ClassificationHead,
        "token-classification": TokenClassificationHead,
        "causal-lm": CausalLMHead,
        "scalar": ScalarHead,
    }[config.head](config)
