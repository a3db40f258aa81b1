"""The model's extension points are interfaces, not duck-typed slots: prefix sources implement
models/prefixes.py's InputPrefix / AttentionPrefix, and only a kernels.LowRankWrapper shares the
stacked Q/K/V GEMM; anything else is refused (prefixes) or runs the plain formula (GEMM)."""

import pytest
import torch
from torch import nn

from lmforge import kernels
from lmforge.kernels import gemm, onednn
from lmforge.kernels.calibrate import CHOICES
from lmforge.models.prefixes import AttentionPrefix, InputPrefix


def tiny_model(model_type="bert"):
    from tests.test_packing import random_model, tiny
    return random_model(tiny(model_type, "classification")).eval()


class FixedKV(AttentionPrefix):
    def __init__(self, p, d):
        super().__init__()
        self.k, self.v = nn.Parameter(torch.randn(p, d)), nn.Parameter(torch.randn(p, d))

    def forward(self):
        return self.k, self.v


class FixedTokens(InputPrefix):
    def __init__(self, p, d):
        super().__init__()
        self.t = nn.Parameter(torch.randn(p, d))

    def forward(self):
        return self.t


class Duck(nn.Module):   # has forward() but is not the interface
    def forward(self):
        return None


@pytest.mark.parametrize("where", ["attention", "input"])
def test_prefix_slots_take_only_their_interface(where):
    model = tiny_model()
    d = model.config.hidden_size
    attach = (model.transformer.layers[0].attention.attach_prefix if where == "attention"
              else model.transformer.attach_input_prefix)
    with pytest.raises(TypeError, match="attach"):
        attach(Duck())
    with pytest.raises(TypeError):
        attach(FixedTokens(2, d) if where == "attention" else FixedKV(2, d))   # the other interface
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    before = model(ids).logits
    source = FixedKV(2, d) if where == "attention" else FixedTokens(2, d)
    assert attach(source) is source
    assert attach(FixedKV(2, d) if where == "attention" else FixedTokens(2, d)) is source   # first one stays
    assert not torch.allclose(model(ids).logits, before)    # the prefix takes part in the pass


class Scaled(kernels.LowRankWrapper):
    """base(x) + 0.5 * (x A^T) B^T: the interface, implemented."""

    def __init__(self, base, r=2):
        super().__init__()
        self.base = base
        self.A, self.B = torch.randn(r, base.in_features), torch.randn(base.out_features, r)

    def low_rank_updates(self, x):
        return [(x @ self.A.T, self.B, 0.5)]

    def forward(self, x):
        return self.base(x) + 0.5 * (x @ self.A.T) @ self.B.T


class DuckScaled(nn.Module):
    """The same computation and method names, without the interface."""
    low_rank_updates = Scaled.low_rank_updates
    forward = Scaled.forward

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.A, self.B = torch.randn(2, base.in_features), torch.randn(base.out_features, 2)


@pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("wrapper, stacked", [(Scaled, True), (DuckScaled, False)])
def test_only_a_low_rank_wrapper_shares_the_stacked_gemm(wrapper, stacked, monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNELS", "onednn")
    CHOICES.reset()
    try:
        torch.manual_seed(0)
        bases = [nn.Linear(16, 16).requires_grad_(False) for _ in range(3)]
        layers = (wrapper(bases[0]), bases[1], wrapper(bases[2]))
        calls = []
        real = gemm.stacked_onednn
        monkeypatch.setattr(gemm, "stacked_onednn", lambda *a, **k: calls.append(1) or real(*a, **k))
        x = torch.randn(9, 16, requires_grad=True)
        y = kernels.stacked_linear(x, layers)
        want = torch.cat([m(x) for m in layers], -1)
        assert bool(calls) == stacked
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    finally:
        CHOICES.reset()
