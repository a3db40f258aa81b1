"""Prefix tuning, the two variants the LoRA paper compares (Li & Liang, 2021; Hu et al., 2021, 5.1):

prefix-embedding  P trainable virtual-token embeddings inserted into the input (after [CLS] in an
                  encoder, at the start of a decoder); they pass through every layer like tokens.
                  Trainable parameters: P x d.
prefix-layer      trainable keys and values of P virtual tokens in every layer, which every query
                  attends to; the model's activations for them are replaced at each layer.
                  Trainable parameters: L x 2 x P x d.

The modules plug into the hook slots the model provides (Transformer.input_prefix,
Attention.kv_prefix) and keep their prefixes in dicts keyed by adapter name, with one active.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError

KINDS = ("embedding", "layer")


@dataclass
class PrefixConfig:
    kind: str = "layer"
    length: int = 16          # P, the number of virtual tokens
    init_std: float = 0.02

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"prefix kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.length < 1:
            raise ConfigError(f"prefix length must be >= 1, got {self.length}")


class VirtualTokens(nn.Module):
    """Named sets of P trainable vectors [P, D]; forward() gives the active set (or None)."""

    def __init__(self):
        super().__init__()
        self.prefixes = nn.ParameterDict()
        self.active: str | None = None

    def add(self, name: str, length: int, dim: int, std: float, like: torch.Tensor) -> None:
        self.prefixes[name] = nn.Parameter(torch.randn(length, dim, dtype=like.dtype).to(like.device) * std)
        self.active = name

    def forward(self):
        return None if self.active is None else self.prefixes[self.active]


class KeyValuePrefix(nn.Module):
    """Named pairs of trainable prefix keys and values [P, D]; forward() gives the active pair."""

    def __init__(self):
        super().__init__()
        self.keys = nn.ParameterDict()
        self.values = nn.ParameterDict()
        self.active: str | None = None

    def add(self, name: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[name], self.values[name] = nn.Parameter(keys), nn.Parameter(values)
        self.active = name

    def forward(self):
        return None if self.active is None else (self.keys[self.active], self.values[self.active])


@torch.no_grad()
def _real_token_activations(model, length: int, generator: torch.Generator):
    """Keys and values [L][P, D] of P random vocabulary tokens run through the frozen model:
    prefixes that start as plausible activations train far more stably than random vectors."""
    device = model.transformer.embeddings.word_embeddings.weight.device
    ids = torch.randint(1000 if model.config.vocab_size > 2000 else 0, model.config.vocab_size, (1, length),
                        generator=generator).to(device)
    out: list = []
    hooks = [layer.attention.register_forward_pre_hook(
        lambda mod, args, kw=None: out.append((mod.key(args[0])[0].clone(), mod.value(args[0])[0].clone())))
        for layer in model.transformer.layers]
    try:
        was = model.training
        model.eval()
        model.transformer(ids)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return out


def add_prefix(model, name: str, config: PrefixConfig, seed: int = 0) -> None:
    """Add prefix `name` and make it the active one."""
    t = model.transformer
    d, like = model.config.hidden_size, t.embeddings.word_embeddings.weight
    if config.kind == "embedding":
        if t.input_prefix is None:
            t.input_prefix = VirtualTokens()
        if name in t.input_prefix.prefixes:
            raise ConfigError(f"prefix {name!r} already exists")
        t.input_prefix.add(name, config.length, d, config.init_std, like)
        return
    kv = _real_token_activations(model, config.length, torch.Generator().manual_seed(seed))
    for layer, (k, v) in zip(t.layers, kv):
        if layer.attention.kv_prefix is None:
            layer.attention.kv_prefix = KeyValuePrefix()
        if name in layer.attention.kv_prefix.keys:
            raise ConfigError(f"prefix {name!r} already exists")
        layer.attention.kv_prefix.add(name, k.detach().clone(), v.detach().clone())


def prefix_parameters(model) -> list[nn.Parameter]:
    out = []
    for m in model.modules():
        if isinstance(m, (VirtualTokens, KeyValuePrefix)):
            out.extend(m.parameters())
    return out
