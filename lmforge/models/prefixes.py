"""The two points where prefix tuning extends the model, as interfaces (adapters/prefix.py implements
them; the model knows nothing else of adapters).

InputPrefix      forward() -> [P, D] virtual-token vectors for the current forward pass, or None;
                 Transformer.attach_input_prefix inserts them into the input.
AttentionPrefix  forward() -> (keys, values), each [P, D], that every query of one layer may attend
                 to in the current forward pass, or None; Attention.attach_prefix.

forward() takes no arguments: which adapter a pass uses is the pass's routing (models/routing.py),
which an implementation reads per call, so threads can run passes with different prefixes at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class InputPrefix(nn.Module, ABC):
    @abstractmethod
    def forward(self) -> torch.Tensor | None:
        """Virtual-token vectors [P, D] for this forward pass, or None."""


class AttentionPrefix(nn.Module, ABC):
    @abstractmethod
    def forward(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prefix keys and values [P, D] for this forward pass, or None."""


def checked(prefix, kind: type, where: str):
    """`prefix` if it implements `kind`; a TypeError naming the slot otherwise."""
    if not isinstance(prefix, kind):
        raise TypeError(f"{where} takes a {kind.__name__} (models/prefixes.py), got {type(prefix).__name__}")
    return prefix
