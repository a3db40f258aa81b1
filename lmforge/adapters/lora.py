"""LoRA (Hu et al., 2021): h = W x + (alpha / r) * B A x, with W frozen, A in R^{r x k}, B in R^{d x r}.

LoraLinear wraps the nn.Linear it adapts (it does not subclass it) and keeps any number of adapters
in dicts keyed by name. Which adapters apply is an argument of the forward pass: the wrapper reads
the routing of the call running on its thread (models/routing.py), either the same adapters for every
row, or one adapter per row (a mixed batch, computed in one pass by gathering each row's A and B).
The wrapper keeps no per-call state, so threads may run forward passes on one model concurrently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.kernels import LowRankWrapper
from lmforge.models import routing
from lmforge.models.layers import Dropout


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    bias: str = "none"                # none | all | lora_only: which biases train with the adapter

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.r < 1:
            raise ConfigError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"LoRA bias {self.bias!r} is not one of none, all, lora_only")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(LowRankWrapper):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.merged: list[str] = []
        self._stack_cache: tuple | None = None   # (key, stacked A/B) for inference

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add(self, name: str, config: LoraConfig) -> None:
        A = nn.Linear(self.in_features, config.r, bias=False)
        B = nn.Linear(config.r, self.out_features, bias=False)
        # A as nn.Linear's default (Kaiming-uniform), B zero: training starts from the base model.
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        nn.init.zeros_(B.weight)
        w = self._reference_weight()
        A.to(w.device, w.dtype)
        B.to(w.device, w.dtype)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling[name] = config.scaling

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise ConfigError(f"adapter {name!r} is merged: unmerge it before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.scaling[name]

    def _reference_weight(self) -> torch.Tensor:
        w = self.base.weight
        if callable(w):  # a dynamically quantized base: adapters stay fp32 on its device
            return w().dequantize()
        return w

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B A: the [out, in] update this adapter adds to W."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return  # idempotent
        if callable(self.base.weight):
            raise ConfigError(f"adapter {name!r} cannot be merged into a quantized layer; merge before quantizing")
        merged = self.base.weight + self.delta_weight(name).to(self.base.weight.dtype)
        if not torch.isfinite(merged).all():
            raise ConfigError(f"merging adapter {name!r} would put NaN/Inf into the weights; not merged")
        self.base.weight.copy_(merged)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        for n in [name] if name else list(self.merged):
            if n in self.merged:
                self.base.weight.sub_(self.delta_weight(n).to(self.base.weight.dtype))
                self.merged.remove(n)

    def _stacked(self, slots: list[str]):
        """A [S * r_max, in] and B [out, S * r_max] of the slots side by side (ranks zero-padded),
        and each slot's scale [S]."""
        # keyed by the tensors themselves and their version counters: any change to A or B (an
        # optimizer step, a load, another adapter under the same name) builds a new stack
        key = tuple((n, id(self.lora_A[n].weight), self.lora_A[n].weight._version,
                     id(self.lora_B[n].weight), self.lora_B[n].weight._version) for n in slots)
        cached = self._stack_cache  # one read: another thread may replace it meanwhile
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        r_max = max(self.lora_A[n].weight.shape[0] for n in slots)
        w = self.lora_A[slots[0]].weight
        A = w.new_zeros(len(slots), r_max, self.in_features)
        B = w.new_zeros(self.out_features, len(slots), r_max)
        for i, n in enumerate(slots):
            r = self.lora_A[n].weight.shape[0]
            A[i, :r] = self.lora_A[n].weight
            B[:, i, :r] = self.lora_B[n].weight
        scale = torch.tensor([self.scaling[n] for n in slots], dtype=w.dtype, device=w.device)
        stacked = (A.view(-1, self.in_features), B.view(self.out_features, -1), scale, r_max)
        if not torch.is_grad_enabled():
            self._stack_cache = (key, stacked)
        return stacked

    def _mixed(self, x: torch.Tensor, y: torch.Tensor, r: routing.Routing) -> torch.Tensor:
        """Every row of x with its own adapter, in two GEMMs for the whole batch: x times all
        adapters' A side by side [rows, S * r], a gate that keeps only each row's own adapter's
        r columns (times its scale), then times all B side by side. No sub-batches, no per-row
        weight copies."""
        slots = r.names
        present = [n for n in slots if n in self.lora_A]
        if not present:
            return y
        if self.merged:
            raise ConfigError("mixed-adapter batches need unmerged adapters: call unmerge() first")
        # Slots whose adapter does not touch this layer act as "no adapter" here.
        remap = torch.tensor([present.index(n) if n in present else -1 for n in slots] + [-1],
                             device=x.device)
        rows = len(r.per_row)
        if x.dim() == 3:                                      # padded [B, T, in]
            slot = remap[r.row_slots(x.device)].repeat_interleave(x.shape[1])   # [B * T]
        else:                                                 # packed [N, in], or one row each [B, in]
            tokens = r.token_slots(x.device)
            if tokens is not None and x.shape[0] == tokens.shape[0]:
                slot = remap[tokens]                          # [N]
            elif x.shape[0] == rows:
                slot = remap[r.row_slots(x.device)]           # [B]
            else:
                raise ConfigError(f"a mixed-adapter routing of {rows} rows does not fit an input of "
                                  f"{x.shape[0]} rows (a packed batch needs its layout: pass packed=)")
        A, B, scale, r_max = self._stacked(present)
        gate = torch.nn.functional.one_hot(slot + 1, len(present) + 1)[:, 1:].to(x.dtype) * scale  # [R, S]
        h = x.reshape(-1, self.in_features) @ A.T             # [R, S * r]
        h = h * gate.repeat_interleave(r_max, dim=1)
        return y + (h @ B.T).view(y.shape)

    def _updates(self, x: torch.Tensor, names: tuple[str, ...]) -> list[tuple]:
        return [(self.lora_A[n](self.lora_dropout[n](x)), self.lora_B[n].weight, self.scaling[n])
                for n in names if n in self.lora_A and n not in self.merged]

    def low_rank_updates(self, x: torch.Tensor) -> list[tuple] | None:
        """[(h, B, scale)] with forward(x) = base(x) + sum of scale * h B^T, h = A(dropout(x)) [.., r]
        and B the [out, r] weight, for the adapters of the current call; None for a mixed-adapter
        batch. Lets a caller run this layer's base GEMM together with others (lowrank_concat_linear)."""
        r = routing.current()
        if r.mixed:
            return None
        return self._updates(x, r.uniform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        r = routing.current()
        if r.mixed:
            return self._mixed(x, y, r)
        for h, B, scale in self._updates(x, r.uniform):
            # (x A^T) B^T: two thin GEMMs, never the d x k product B A; the second one also
            # scales and adds to y (addmm: no separate passes over [N, out])
            y = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(), alpha=scale).view(y.shape)
        return y
