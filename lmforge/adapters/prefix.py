"""Prefix tuning, the two variants the LoRA paper compares (Li & Liang, 2021; Hu et al., 2021, 5.1):

prefix-embedding  P trainable virtual-token embeddings inserted into the input (after [CLS] in an
                  encoder, at the start of a decoder); they pass through every layer like tokens.
                  Trainable parameters: P x d.
prefix-layer      trainable keys and values of P virtual tokens in every layer, which every query
                  attends to; the model's activations for them are replaced at each layer.
                  Trainable parameters: L x 2 x P x d.

The modules implement the model's prefix interfaces (models/prefixes.py: InputPrefix, attached with
Transformer.attach_input_prefix; AttentionPrefix, with Attention.attach_prefix) and keep their prefixes in dicts keyed by adapter name. Which prefix a forward
pass uses is an argument of that pass (models/routing.py), read per call; nothing is switched on the
modules, so threads may run forward passes with different prefixes at the same time. A prefix
lengthens the sequence (virtual tokens) or the keys (every layer) of the rows that use it, so rows
with and without it, or with different prefixes, cannot share one forward pass: a mixed-adapter
routing that names a prefix is refused (methods.Prefix.mixable is False), as is stacking two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import routing
from lmforge.models.prefixes import AttentionPrefix, InputPrefix

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


def _routed(names, kind: str) -> str | None:
    """The one adapter of `names` (those this module holds) that the current forward pass uses."""
    r = routing.current()
    if r.mixed:
        used = [n for n in r.names if n in names]
        if used:
            raise ConfigError(f"prefix {used[0]!r} cannot run in a mixed-adapter batch: a prefix ({kind}) "
                              "changes the sequence of the rows that use it; run its rows as a batch of their own")
        return None
    used = [n for n in r.uniform if n in names]
    if len(used) > 1:
        raise ConfigError(f"prefixes {', '.join(map(repr, used))} cannot be stacked in one forward pass")
    return used[0] if used else None


class VirtualTokens(InputPrefix):
    """Named sets of P trainable vectors [P, D]; forward() gives the set of the adapter the current
    forward pass routes to (or None)."""

    def __init__(self):
        super().__init__()
        self.prefixes = nn.ParameterDict()

    def add(self, name: str, length: int, dim: int, std: float, like: torch.Tensor) -> None:
        self.prefixes[name] = nn.Parameter(torch.randn(length, dim, dtype=like.dtype).to(like.device) * std)

    def forward(self):
        name = _routed(self.prefixes, "virtual input tokens")
        return None if name is None else self.prefixes[name]


class KeyValuePrefix(AttentionPrefix):
    """Named pairs of trainable prefix keys and values [P, D]; forward() gives the pair of the adapter
    the current forward pass routes to (or None)."""

    def __init__(self):
        super().__init__()
        self.keys = nn.ParameterDict()
        self.values = nn.ParameterDict()

    def add(self, name: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[name], self.values[name] = nn.Parameter(keys), nn.Parameter(values)

    def forward(self):
        name = _routed(self.keys, "keys and values in every layer")
        return None if name is None else (self.keys[name], self.values[name])


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
    """Add prefix `name`; forward passes use it when their routing names it (`model(..., adapters=name)`)."""
    if name in model.adapter_names:
        raise ConfigError(f"adapter {name!r} already exists (loaded: {', '.join(model.adapter_names)})")
    t = model.transformer
    d, like = model.config.hidden_size, t.embeddings.word_embeddings.weight
    if config.kind == "embedding":
        tokens = t.attach_input_prefix(VirtualTokens())
        if name in tokens.prefixes:
            raise ConfigError(f"prefix {name!r} already exists")
        tokens.add(name, config.length, d, config.init_std, like)
        model.register_adapter(name, config)
        return
    kv = _real_token_activations(model, config.length, torch.Generator().manual_seed(seed))
    for layer, (k, v) in zip(t.layers, kv):
        prefix = layer.attention.attach_prefix(KeyValuePrefix())
        if name in prefix.keys:
            raise ConfigError(f"prefix {name!r} already exists")
        prefix.add(name, k.detach().clone(), v.detach().clone())
    model.register_adapter(name, config)   # last: a routing may name it from now on


def prefix_parameters(model) -> list[nn.Parameter]:
    out = []
    for m in model.modules():
        if isinstance(m, (VirtualTokens, KeyValuePrefix)):
            out.extend(m.parameters())
    return out
