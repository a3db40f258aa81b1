"""Which adapters a forward pass uses: an argument of the call, never state of the model.

`Model.forward(..., adapters=...)` turns its argument into a `Routing` and makes it the current one
for the duration of the call (a `contextvars.ContextVar`, reset in `finally`). Layers that hold
adapters (LoRA wrappers, which live in `lmforge.adapters`) read it with `current()`; this module
knows nothing of them. Context variables are per thread (and per asyncio task), so two threads
running forward passes on one model at the same time each see their own routing.

A routing is either uniform (the same adapters, possibly several stacked, for every row) or per row
(row i uses `per_row[i]`, None = the base model: a mixed-adapter batch in one forward pass). For a
packed stream, `token_rows` [N] gives the row of each token.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

@dataclass(frozen=True, eq=False)
class Routing:
    uniform: tuple[str, ...] = ()                  # adapters applied to every row (stacked, in order)
    per_row: tuple[str | None, ...] | None = None  # or: the adapter of each row (None = base)
    token_rows: torch.Tensor | None = None         # [N] row of each token of a packed stream
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.uniform and self.per_row is not None:
            raise ValueError("a routing is uniform or per row, not both")

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def of(cls, adapters, batch_size: int | None = None) -> "Routing":
        """None -> base model; "name" -> that adapter for every row; a list/tuple -> one entry per row
        (its length must be the batch size); a Routing is returned as is."""
        if isinstance(adapters, Routing):
            return adapters
        if adapters is None:
            return BASE
        if isinstance(adapters, str):
            return cls(uniform=(adapters,))
        rows = tuple(adapters)
        if not all(a is None or isinstance(a, str) for a in rows):
            raise TypeError(f"adapters must be names or None, got {rows!r}")
        if batch_size is not None and len(rows) != batch_size:
            raise ValueError(f"adapters names {len(rows)} rows but the batch has {batch_size}")
        if len(set(rows)) == 1:   # every row the same: the cheaper uniform routing
            return BASE if rows[0] is None else cls(uniform=(rows[0],))
        return cls(per_row=rows)

    @classmethod
    def stack(cls, *names: str) -> "Routing":
        """Several adapters applied together to every row."""
        return cls(uniform=tuple(names)) if names else BASE

    def with_tokens(self, token_rows: torch.Tensor | None) -> "Routing":
        if self.per_row is None or token_rows is None:
            return self
        return Routing(per_row=self.per_row, token_rows=token_rows)

    # -- queries ----------------------------------------------------------------------------------
    @property
    def mixed(self) -> bool:
        return self.per_row is not None

    @property
    def names(self) -> tuple[str, ...]:
        """Every adapter this routing uses, each once, in a fixed (sorted) order for mixed ones."""
        if self.per_row is None:
            return self.uniform
        return tuple(sorted({n for n in self.per_row if n is not None}))

    def row_slots(self, device) -> torch.Tensor:
        """[B] index of each row's adapter in `names` (-1: base), cached per device."""
        key = ("rows", str(device))
        t = self._cache.get(key)
        if t is None:
            slots = self.names
            t = torch.tensor([slots.index(n) if n is not None else -1 for n in self.per_row], device=device)
            self._cache[key] = t
        return t

    def token_slots(self, device) -> torch.Tensor | None:
        """[N] index of each packed token's adapter in `names` (-1: base), or None when not packed."""
        if self.token_rows is None:
            return None
        key = ("tokens", str(device))
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = self.row_slots(device)[self.token_rows.to(device)]
        return t


BASE = Routing()
INHERIT = object()   # Model.forward's default for `adapters`: the routing of the enclosing block
_current: contextvars.ContextVar[Routing] = contextvars.ContextVar("lmforge_routing", default=BASE)


def current() -> Routing:
    """The routing of the forward pass running on this thread (BASE outside any)."""
    return _current.get()


@contextlib.contextmanager
def using(adapters, batch_size: int | None = None, token_rows: torch.Tensor | None = None):
    """Make `adapters` (see Routing.of) the routing of every forward pass in this block, on this
    thread only: for code that calls the trunk directly, or a loop of calls (generation, training)."""
    token = _current.set(Routing.of(adapters, batch_size).with_tokens(token_rows))
    try:
        yield
    finally:
        _current.reset(token)
