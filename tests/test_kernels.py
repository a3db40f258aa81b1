"""The CPU fast paths match what they replace: prepacked Linear vs F.linear (outputs and every
gradient), the dropout mask's statistics, and the manual attention with dropout vs SDPA."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.layers import Dropout, attend, keep_mask
from lmforge.models.linear import Linear


@pytest.mark.parametrize("shape", [(5, 7, 32), (1, 32), (40, 32)])
@pytest.mark.parametrize("trainable", [True, False])
def test_prepacked_linear_matches_f_linear_and_its_gradients(shape, trainable):
    torch.manual_seed(0)
    lin = Linear(32, 48)
    lin.weight.requires_grad_(trainable)
    x = torch.randn(*shape, requires_grad=True)
    y = lin(x)
    want = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, lin.bias] + ([lin.weight] if trainable else []), g)
    ref = torch.autograd.grad(want, [x, lin.bias] + ([lin.weight] if trainable else []), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_prepacked_weight_follows_in_place_updates():
    lin = Linear(16, 8).eval()
    x = torch.randn(3, 16)
    before = lin(x)
    lin.weight.add_(1.0)                 # an optimizer step, a LoRA merge, a checkpoint load ...
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lin(x), before)


def test_keep_mask_and_dropout_statistics():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    for p in (0.1, 0.5):
        frac = keep_mask(x, p).float().mean().item()
        assert abs(frac - (1 - p)) < 0.003, (p, frac)
    d = Dropout(0.1).train()
    y = d(x)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.9)
    assert abs(y.mean().item() - 1) < 0.01
    assert torch.equal(d.eval()(x), x)
    masks = [keep_mask(torch.empty(64, 64), 0.5) for _ in range(2)]
    assert not torch.equal(*masks)  # fresh randomness every call


@pytest.mark.parametrize("kind", ["none", "bool", "additive", "causal"])
def test_manual_attention_path_equals_sdpa(kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = None
    if kind == "bool":
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    if kind == "additive":
        mask = torch.zeros(2, 1, 1, 5).masked_fill(torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool), -1e9)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kind == "causal")
    # p below 1/65536 rounds to "keep everything": the manual path with no element dropped
    got = attend(q, k, v, mask, 1e-9, is_causal=kind == "causal")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type, act", [("bert", "gelu"), ("gpt2", "gelu_new"), ("bert", "relu")])
@pytest.mark.parametrize("packed", [True, False])
def test_fused_inference_path_equals_the_training_path(model_type, act, packed):
    # inference fuses Q/K/V into one GEMM and GELU / the residual add into the FFN GEMMs; with autograd
    # on, the model runs the separate ops: both give the same outputs
    from lmforge.data.batches import collate, collate_packed, model_inputs
    from tests.test_packing import items, random_model, tiny

    head = "causal-lm" if model_type == "gpt2" else "classification"
    model = random_model(tiny(model_type, head, hidden_act=act)).eval()
    batch = (collate_packed if packed else lambda xs: collate(xs, 0))(items([7, 3, 12, 5]))
    inputs = model_inputs(batch)
    reference = model(**inputs)
    with torch.inference_mode():
        fused = model(**inputs)
    for name in ("hidden_states", "logits"):
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), rtol=1e-5, atol=1e-5)
    assert ("concat" in model.transformer.layers[0].attention.query._packs) == packed


@pytest.mark.parametrize("setup", ["lora-qv", "lora-qkv-two-adapters", "prefix-layer", "gpt2-lora"])
def test_training_qkv_as_one_gemm_equals_three_projections(setup, monkeypatch):
    # training with frozen Q/K/V (LoRA, prefix tuning) runs them as one GEMM plus the adapters'
    # low-rank terms (models/linear.py: lowrank_concat_linear): same loss and gradients as three
    import lmforge.models.layers as layers
    from lmforge.adapters.lora import LoraConfig
    from lmforge.adapters.manager import add_adapter
    from lmforge.adapters.methods import MethodConfig, apply_method
    from lmforge.data.batches import collate_packed, model_inputs
    from lmforge.models.routing import Routing
    from tests.test_packing import items, random_model, tiny

    model_type = "gpt2" if setup.startswith("gpt2") else "bert"
    config = tiny(model_type, "causal-lm" if model_type == "gpt2" else "classification")
    config.hidden_dropout = config.attention_dropout = 0.1
    model = random_model(config)
    route = None   # the adapters every forward pass runs with
    if setup == "prefix-layer":
        apply_method(model, MethodConfig(method="prefix-layer", prefix_length=3))
    else:
        targets = ("query", "key", "value") if "qkv" in setup else ("query", "value")
        for p in model.parameters():
            p.requires_grad_(False)
        names = ["a", "b"] if "two" in setup else ["a"]
        for n in names:
            add_adapter(model, n, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=targets), head=False)
        route = Routing.stack(*names)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
                with torch.no_grad():
                    p.normal_(0, 0.3)
    model.train()
    inputs = model_inputs(collate_packed(items([7, 3, 12, 5, 9])))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable

    def run():
        torch.manual_seed(5)   # the same dropout masks, drawn in the same order, on both paths
        out = model(**inputs, adapters=route)
        loss = out.logits.float().pow(2).mean()
        return loss, torch.autograd.grad(loss, trainable)

    applied = []   # per call: did the one-GEMM path run (not None, which falls back to three)?
    real = layers.lowrank_concat_linear

    def spy(*a):
        out = real(*a)
        applied.append(out is not None)
        return out

    monkeypatch.setattr(layers, "lowrank_concat_linear", spy)
    fused_loss, fused_grads = run()
    assert applied and all(applied), applied
    monkeypatch.setattr(layers, "lowrank_concat_linear", lambda *a: None)
    loss, grads = run()
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
