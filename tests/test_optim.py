"""The optimizer and schedules: BERT's weight-decay exclusions, the fused AdamW step against torch's
per-tensor reference (including gradients whose memory layout differs from the parameter's)."""

import pytest
import torch
from torch import nn

from lmforge.train.optim import build_optimizer, lr_lambda, param_groups


def test_no_decay_on_biases_and_layernorm():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [model[0].weight] and decay["weight_decay"] == 0.1
    assert no_decay["params"] == [model[0].bias, model[1].weight, model[1].bias] and no_decay["weight_decay"] == 0


GRADS = {
    "contiguous": lambda shape: torch.randn(shape),
    "transposed": lambda shape: torch.randn(shape[::-1]).t(),            # what x^T @ dy can hand back
    "sliced": lambda shape: torch.randn(shape[0], 2 * shape[1])[:, ::2],
}


@pytest.mark.parametrize("layout", GRADS)
def test_fused_adamw_matches_the_per_tensor_reference(layout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 24), nn.LayerNorm(24))
    ref = nn.Sequential(nn.Linear(48, 24), nn.LayerNorm(24))
    ref.load_state_dict(model.state_dict())
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"]
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-2, foreach=False)
    for _ in range(4):
        for p, q in zip(model.parameters(), ref.parameters()):
            g = GRADS[layout](tuple(p.shape)) if p.dim() == 2 else torch.randn(p.shape)
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("schedule, step, expected", [
    ("linear", 0, 1 / 11), ("linear", 9, 10 / 11), ("linear", 10, 1.0), ("linear", 55, 0.5), ("linear", 100, 0.0),
    ("cosine", 55, 0.5), ("cosine", 100, 0.0), ("constant", 90, 1.0),
    # Vaswani et al.: sqrt(warmup / step) of the peak after the warm-up (steps counted from 1 here)
    ("inverse-sqrt", 9, 10 / 11), ("inverse-sqrt", 10, 1.0), ("inverse-sqrt", 43, 0.5), ("inverse-sqrt", 1099, 0.1),
])
def test_warmup_then_decay(schedule, step, expected):
    assert lr_lambda(schedule, warmup_steps=10, total_steps=100)(step) == pytest.approx(expected)


def test_fused_step_reaches_the_prepacked_linear_weights():
    # a Linear caches its prepacked weight by version: the step must make the next forward see new weights
    from lmforge.models.linear import Linear

    torch.manual_seed(0)
    lin = Linear(16, 8)
    x = torch.randn(4, 16)
    opt = build_optimizer(lin, lr=0.1)
    before = lin(x).detach()
    lin(x).pow(2).sum().backward()
    opt.step()
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
    assert not torch.allclose(lin(x), before)
