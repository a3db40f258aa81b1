"""int8 dynamic quantization: the base trunk's Linear layers only; adapters and heads stay fp32
and exact, mixed-adapter batches still work, and merging is refused with a clear error."""

import pytest
import torch
from torch import nn

from lmforge.adapters.lora import LoraConfig
from lmforge.adapters.manager import add_adapter, classify_mixed, merge
from lmforge.errors import ConfigError
from lmforge.infer.quantize import quantizable, quantize_int8
from lmforge.models import Model, ModelConfig

CONFIG = ModelConfig(vocab_size=60, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     max_position_embeddings=32, head="classification", num_labels=2,
                     hidden_dropout=0.0, attention_dropout=0.0)


@torch.no_grad()
def test_int8_keeps_adapters_fp32_and_outputs_close():
    torch.manual_seed(0)
    model = Model(CONFIG).eval()
    add_adapter(model, "a", LoraConfig(r=4, alpha=8))
    add_adapter(model, "b", LoraConfig(r=4, alpha=8))
    for n, p in model.named_parameters():
        if ".lora_B" in n:
            p.normal_(0, 0.05)
    ids = torch.randint(3, 60, (4, 12))
    mask = torch.ones_like(ids)
    want = model(ids, mask, adapters="a").logits
    n_linear = len(quantizable(model))
    assert n_linear == 2 * 6  # q, k, v, attention.output, intermediate, output per layer
    quantize_int8(model, keep_fp32=("output",))
    # every base Linear replaced but the FFN outputs, kept fp32 as asked
    assert quantizable(model) == ["transformer.layers.0.output", "transformer.layers.1.output"]
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(".lora_A.a")}
    assert kinds == {"Linear"} and all(isinstance(m, nn.Linear) for n, m in model.named_modules()
                                       if n.endswith((".lora_A.a", ".lora_B.a")))
    got = model(ids, mask, adapters="a").logits
    assert not torch.equal(got, want)                               # it did change the arithmetic
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)     # ... by int8 rounding only
    mixed = classify_mixed(model, ids, mask, None, ["a", "b", None, "a"])
    # inputs are quantized with one scale per tensor, so neighbours in a batch move results within
    # int8 rounding (exact equality with offline prediction holds for fp32 only)
    torch.testing.assert_close(mixed[0], got[0], atol=0.05, rtol=0.05)
    with pytest.raises(ConfigError, match="cannot be merged into a quantized layer"):
        merge(model, "a")


@torch.no_grad()
def test_int8_quantizes_every_projection_by_default():
    torch.manual_seed(0)
    model = Model(CONFIG).eval()
    engine = torch.backends.quantized.engine
    quantize_int8(model)
    assert quantizable(model) == []
    assert torch.backends.quantized.engine == engine   # the process-wide setting is left as it was


def test_a_quantized_model_is_not_saved_as_a_checkpoint(tmp_path):
    from lmforge.models.checkpoint import save_pretrained
    model = Model(CONFIG).eval()
    save_pretrained(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    quantize_int8(model)
    with pytest.raises(ConfigError, match="save it before quantizing"):
        save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before   # the good one is untouched


def _calls(module) -> list:
    """A list that grows by one each time module runs (a forward hook)."""
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.fixture
def built(monkeypatch):
    """Every stacked int8 Q/K/V the kernels build, as the tuple of modules it was built from."""
    from lmforge.kernels import int8
    out, real = [], int8.Int8Linear.stacked
    monkeypatch.setattr(int8.Int8Linear, "stacked", classmethod(lambda cls, parts: out.append(parts) or real(parts)))
    return out


@torch.no_grad()
def test_int8_qkv_is_one_projection_with_the_same_results(built, monkeypatch):
    """Where Q, K and V are all int8, kernels.stacked_linear runs them as one int8 GEMM that the
    kernel layer builds and caches itself. It runs only on the packed path (padded attention calls
    query/key/value one by one), so the model runs packed here; a hook on the cached module checks
    the fused GEMM really ran, and it is compared with the three int8 projections apart (forced by
    LMFORGE_KERNELS=stacked=plain): its output slice by slice, and the logits."""
    from lmforge.kernels import int8
    from lmforge.kernels.calibrate import CHOICES
    from lmforge.models.packing import pack_padded

    torch.manual_seed(0)
    model = Model(CONFIG).eval()
    for layer in model.transformer.layers:  # Q, K, V of very different ranges: one scale per output row
        layer.attention.key.weight.data *= 20   # keeps the stacked projection equal to the three apart
        layer.attention.value.weight.data *= 0.05
    quantize_int8(model)
    attentions = [layer.attention for layer in model.transformer.layers]
    assert attentions[0].query.weight().qscheme() == torch.per_channel_affine
    assert not hasattr(attentions[0], "fused_qkv")        # no slot in the model: the kernels decide
    ids = torch.randint(3, 60, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    flat, packed = pack_padded(ids, mask)
    calls = []
    for a in attentions:
        qkv = (a.query, a.key, a.value)
        fused = int8.fused(qkv)
        assert int8.fused(qkv) is fused                   # built once, then cached
        calls.append(_calls(fused))
        # the fused module alone: [Q | K | V] equal to the three int8 projections, in that order
        x = torch.randn(17, CONFIG.hidden_size)
        want = torch.cat([a.query(x), a.key(x), a.value(x)], dim=-1)
        torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-6)
        calls[-1].clear()
    assert len(built) == len(attentions)
    fused_logits = model(flat, packed=packed).logits
    assert [len(c) for c in calls] == [1] * len(attentions)   # the fused GEMM ran, once per layer
    assert len(built) == len(attentions)                      # ... from the cache
    monkeypatch.setenv("LMFORGE_KERNELS", "stacked=plain")    # three separate int8 projections
    CHOICES.reset()
    try:
        apart = model(flat, packed=packed).logits
    finally:
        monkeypatch.delenv("LMFORGE_KERNELS")
        CHOICES.reset()
    assert [len(c) for c in calls] == [1] * len(attentions)   # ... and now it did not
    torch.testing.assert_close(apart, fused_logits, rtol=0, atol=1e-6)
    # the padded path (never fused) agrees too, within int8 rounding of a different batch shape
    torch.testing.assert_close(model(ids, mask).logits, fused_logits, rtol=0.05, atol=0.05)


@torch.no_grad()
def test_int8_qkv_cache_follows_the_modules(built):
    """A replaced projection gets a new fused module with its weights; a LoRA-wrapped query keeps the
    projections separate (the adapter must see its own input); a dropped model frees its entries."""
    import gc

    from lmforge.kernels import int8
    from lmforge.models.packing import pack_padded

    torch.manual_seed(0)
    model = quantize_int8(Model(CONFIG).eval())
    a = model.transformer.layers[0].attention
    old = int8.fused((a.query, a.key, a.value))
    a.key = int8.Int8Linear(nn.Linear(CONFIG.hidden_size, CONFIG.hidden_size))
    new = int8.fused((a.query, a.key, a.value))
    assert new is not old
    x = torch.randn(5, CONFIG.hidden_size)
    torch.testing.assert_close(new(x), torch.cat([a.query(x), a.key(x), a.value(x)], -1), rtol=0, atol=1e-6)
    import weakref
    query, stacked = weakref.ref(a.query), weakref.ref(new)
    built.clear()
    del model, a, old, new
    gc.collect()
    assert query() is None and stacked() is None             # weakly keyed: nothing kept alive
    lora = Model(CONFIG).eval()
    add_adapter(lora, "a", LoraConfig(r=4, alpha=8))
    quantize_int8(lora)
    ids = torch.randint(3, 60, (2, 6))
    flat, packed = pack_padded(ids, torch.ones_like(ids))
    lora(flat, packed=packed, adapters="a")
    assert built == []                                       # no fused Q/K/V around a LoRA query


@torch.no_grad()
def test_int8_linear_scales_weights_per_row_and_inputs_in_8_bits():
    from lmforge.kernels.int8 import REDUCE_RANGE as _REDUCE_RANGE, Int8Linear, prepack_engine
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    lin.weight[:32] *= 50                       # rows of very different ranges
    with prepack_engine():
        q = Int8Linear(lin)
    w = q.weight().dequantize()
    row_step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert ((w - lin.weight).abs() <= row_step / 2 + 1e-7).all()   # each row rounds on its own grid
    x = torch.randn(100, 256)
    want = lin(x)
    err = ((q(x) - want).abs().max() / want.abs().max()).item()
    # 8 bits give about half the error of torch's 7-bit reduce_range
    assert err < (0.03 if _REDUCE_RANGE else 0.015), err   # 7 bits: 0.021 here


@torch.no_grad()
@pytest.mark.parametrize("bias", [True, False])
def test_int8_inputs_are_scaled_per_row(bias):
    """One outlier token must not coarsen the others: each row is quantized on its own scale, so a
    row beside one 1,000x larger is as accurate as alone (one scale per tensor: about 100% error)."""
    from lmforge.kernels.int8 import Int8Linear, prepack_engine
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=bias)
    with prepack_engine():
        q = Int8Linear(lin)
    x = torch.randn(4, 256)
    x[0] *= 1000                                   # the outlier token
    want = lin(x)
    got = q(x)
    err = ((got - want).abs().amax(1) / want.abs().amax(1))           # per row, relative
    assert (err < 0.03).all(), err
    assert torch.allclose(q(x[1:2]), got[1:2], rtol=0.05, atol=0.05 * want[1].abs().max().item())


@torch.no_grad()
def test_int8_model_copies_and_pickles_with_the_same_results():
    import copy
    import pickle
    torch.manual_seed(0)
    model = quantize_int8(Model(CONFIG).eval())
    ids = torch.randint(3, 60, (2, 8))
    mask = torch.ones_like(ids)
    want = model(ids, mask).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(ids, mask).logits, want)   # the same kernel, not a repack for fbgemm


@pytest.mark.parametrize("flags, cap, reduce", [
    ({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}, None, False),          # VNNI: 8-bit inputs
    ({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}, "AVX512_CORE", True),  # hidden from oneDNN
    ({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni"}, "AVX2", True),
    ({"avx2", "fma", "avx_vnni"}, None, False),                                   # AVX-VNNI laptops
    ({"avx2", "fma"}, None, True),
])
def test_int8_inputs_keep_7_bits_where_onednn_has_no_vnni(monkeypatch, flags, cap, reduce):
    """Without VNNI the u8 x s8 products are summed in saturating int16, so inputs keep 7 bits; the
    check follows the ISA cap oneDNN runs under, not only the CPU."""
    from lmforge.kernels import int8, machine
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("Test CPU", frozenset(flags)))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert int8._reduce_range() is reduce
