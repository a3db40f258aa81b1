"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021): a small down-projection,
nonlinearity and up-projection added to a sublayer's output, h + up(act(down(h))), before the
residual connection. Houlsby places one after attention and one after the FFN; Pfeiffer only after
the FFN. "lin" is the LoRA paper's AdapterL (Lin et al., 2020): one adapter after the FFN whose input
goes through a LayerNorm of its own first, h + up(act(down(LN(h)))). The up-projection starts at
zero, so training starts from the base model.

BottleneckAdapter wraps the sublayer's output projection (it does not subclass it) and keeps
adapters in dicts keyed by name, like LoRA. Which adapters apply is an argument of the forward pass
(models/routing.py), read per call: the same adapters (stacked in order) for every row, or one per
row in a mixed batch, where each row's tokens go through their own adapter. The wrapper keeps no
per-call state, so threads may run forward passes on one model concurrently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import routing

PLACEMENT = {"houlsby": ("attention.output", "output"), "pfeiffer": ("output",), "lin": ("output",)}
NORMED = ("lin",)   # kinds whose adapter normalises its input (a LayerNorm inside the adapter)


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
        self.norm = nn.LayerNorm(d) if config.kind in NORMED else None
        self.down = nn.Linear(d, config.size)
        self.up = nn.Linear(config.size, d)
        self.act = getattr(F, config.activation)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        x = h if self.norm is None else self.norm(h)
        return h + self.up(self.act(self.down(x)))


class BottleneckAdapter(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()

    def add(self, name: str, config: BottleneckConfig) -> None:
        w = self.base.weight
        self.adapters[name] = Bottleneck(self.base.out_features, config).to(w.device, w.dtype)

    def forward(self, x):
        h = self.base(x)
        r = routing.current()
        if r.mixed:
            return self._mixed(h, r)
        for name in r.uniform:       # several adapters stack in the routing's order
            if name in self.adapters:
                h = self.adapters[name](h)
        return h

    def _mixed(self, h: torch.Tensor, r: routing.Routing) -> torch.Tensor:
        """Each row's tokens through its own adapter (rows of other adapters and of the base model
        pass unchanged): one adapter call per adapter present, on the rows that name it."""
        names = r.names
        if not any(n in self.adapters for n in names):
            return h
        flat = h.reshape(-1, h.shape[-1])                  # [rows, D]: padded [B, T, D] or packed [N, D]
        if h.dim() == 3:
            slot = r.row_slots(h.device).repeat_interleave(h.shape[1])   # [B * T]
        else:
            tokens = r.token_slots(h.device)
            if tokens is not None and flat.shape[0] == tokens.shape[0]:
                slot = tokens                               # [N]
            elif flat.shape[0] == len(r.per_row):
                slot = r.row_slots(h.device)                # [B], one token per row
            else:
                raise ConfigError(f"a mixed-adapter routing of {len(r.per_row)} rows does not fit an input of "
                                  f"{flat.shape[0]} rows (a packed batch needs its layout: pass packed=)")
        out = flat
        for i, name in enumerate(names):
            if name not in self.adapters:
                continue
            rows = (slot == i).nonzero().squeeze(1)
            if rows.numel():
                out = out.index_copy(0, rows, self.adapters[name](flat.index_select(0, rows)))
        return out.view(h.shape)


def add_bottleneck(model, name: str, config: BottleneckConfig) -> None:
    """Add bottleneck adapter `name` to every layer; forward passes use it when their routing names
    it (`model(..., adapters=name)`, or a name per row)."""
    if name in model.adapter_names:
        raise ConfigError(f"adapter {name!r} already exists (loaded: {', '.join(model.adapter_names)})")
    for layer in model.transformer.layers:
        for path in PLACEMENT[config.kind]:
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            module = getattr(parent, attr)
            if not isinstance(module, BottleneckAdapter):
                module = BottleneckAdapter(module)
                setattr(parent, attr, module)
            module.add(name, config)
    model.register_adapter(name, config)   # last: a routing may name it from now on
