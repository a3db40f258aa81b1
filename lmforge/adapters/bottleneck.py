"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021): a small down-projection,
nonlinearity and up-projection added to a sublayer's output, h + up(act(down(h))), before the
residual connection. Houlsby places one after attention and one after the FFN; Pfeiffer only after
the FFN. The up-projection starts at zero, so training starts from the base model.

BottleneckAdapter wraps the sublayer's output projection (it does not subclass it) and keeps
adapters in dicts keyed by name, like LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

PLACEMENT = {"houlsby": ("attention.output", "output"), "pfeiffer": ("output",)}


@dataclass
class BottleneckConfig:
    kind: str = "houlsby"
    size: int = 64            # bottleneck dimension m
    activation: str = "relu"

    def __post_init__(self):
        if self.kind not in PLACEMENT:
            raise ConfigError(f"adapter kind {self.kind!r} is not one of {', '.join(PLACEMENT)}")
        if self.size < 1:
            raise ConfigError(f"adapter size must be >= 1, got {self.size}")
        if self.activation not in ("relu", "gelu", "silu"):
            raise ConfigError(f"adapter activation {self.activation!r} is not one of relu, gelu, silu")


class Bottleneck(nn.Module):
    def __init__(self, d: int, config: BottleneckConfig):
        super().__init__()
        self.down = nn.Linear(d, config.size)
        self.up = nn.Linear(config.size, d)
        self.act = getattr(F, config.activation)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))


class BottleneckAdapter(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []

    def add(self, name: str, config: BottleneckConfig) -> None:
        w = self.base.weight
        self.adapters[name] = Bottleneck(self.base.out_features, config).to(w.device, w.dtype)

    def forward(self, x):
        h = self.base(x)
        for name in self.active:
            h = self.adapters[name](h)
        return h


def add_bottleneck(model, name: str, config: BottleneckConfig) -> None:
    for layer in model.transformer.layers:
        for path in PLACEMENT[config.kind]:
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            module = getattr(parent, attr)
            if not isinstance(module, BottleneckAdapter):
                module = BottleneckAdapter(module)
                setattr(parent, attr, module)
            module.add(name, config)
            module.active = [name]
