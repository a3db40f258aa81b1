"""Row-sparse gradients for big embedding tables in full fine-tuning.

A batch touches a few hundred of the 30k rows of a word-embedding table, yet its dense gradient is a
new [V, D] tensor each step (47 MB for MiniLM): allocated, zero-filled (fresh pages from the kernel,
so page faults too) and then read by the optimizer. Here the table's lookup produces a sparse
gradient instead; it is added into a dense gradient buffer that lives for the whole run, and after
each optimizer step only the rows the step touched are zeroed again. The optimizer still sees a
dense gradient (zeros elsewhere), so AdamW's update of every row, moments and weight decay included,
is unchanged. If anything else contributes a dense gradient (a tied LM head), the whole buffer is
zeroed instead.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_ROWS = 4096  # smaller tables (positions, token types) are cheap as they are


class RowSparseGrads:
    def __init__(self, model: nn.Module, min_rows: int = MIN_ROWS):
        self.tables: list[tuple[nn.Embedding, torch.Tensor]] = []
        self._touched: dict[int, list[torch.Tensor]] = {}
        self._dense: set[int] = set()
        self._hooks = []
        for m in model.modules():
            w = getattr(m, "weight", None)
            if (isinstance(m, nn.Embedding) and not m.sparse and w is not None and w.requires_grad
                    and m.num_embeddings >= min_rows):
                m.sparse = True
                w.grad = torch.zeros_like(w)
                self.tables.append((m, w))
                self._touched[id(w)] = []
                self._hooks.append(w.register_hook(self._recorder(w)))

    def _recorder(self, w: torch.Tensor):
        def record(grad: torch.Tensor):
            if grad.is_sparse:
                self._touched[id(w)].append(grad._indices()[0])
            else:
                self._dense.add(id(w))
        return record

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.zero_grad(set_to_none=True) for everything else; these tables keep their buffer
        and zero only the rows written since the last call."""
        kept = [(w, w.grad) for _, w in self.tables]
        optimizer.zero_grad(set_to_none=True)
        for w, g in kept:
            if g is None:
                g = torch.zeros_like(w)
            elif id(w) in self._dense:
                g.zero_()
            elif self._touched[id(w)]:
                g.index_fill_(0, torch.cat(self._touched[id(w)]), 0.0)
            self._touched[id(w)].clear()
            w.grad = g
        self._dense.clear()

    def close(self) -> None:
        """Back to dense lookups; the buffers are released."""
        for (m, w), h in zip(self.tables, self._hooks):
            m.sparse = False
            w.grad = None
            h.remove()
        self.tables, self._hooks = [], []
