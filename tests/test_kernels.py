"""Every kernel agrees with the plain PyTorch fallback: GEMMs (fp32 and bf16, outputs and gradients),
post-ops, stacked Q/K/V with and without LoRA terms, and whole models of every architecture, head and
adaptation method; the calibration cache is keyed, versioned and rebuilt when stale or corrupt;
LMFORGE_KERNELS forces a kernel; --device and --precision resolve as documented. Also the dropout
mask's statistics and the manual attention with dropout vs SDPA. No test here measures speed."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.errors import ConfigError
from lmforge.kernels import calibrate, gemm, machine, onednn
from lmforge.kernels.calibrate import CHOICES
from lmforge.models.layers import Dropout, attend, keep_mask
from lmforge.models.linear import Linear

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")
BF16_TOL = dict(atol=3e-2, rtol=3e-2)   # bf16 has 8 bits of mantissa: ~0.4% per rounding


@pytest.fixture
def force(monkeypatch):
    """force("plain"), force("onednn"), force("linear=onednn,stacked=plain"): LMFORGE_KERNELS for one test."""
    def set_(spec):
        monkeypatch.setenv("LMFORGE_KERNELS", spec)
        CHOICES.reset()
    yield set_
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    CHOICES.reset()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    CHOICES.reset()
    yield tmp_path / "kernels.json"
    CHOICES.reset()


def grads_of(y, tensors, seed=0):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    return torch.autograd.grad(y, tensors, g)


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 7, 32), (1, 32), (40, 32)])
@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_linear_matches_f_linear_and_its_gradients(shape, trainable, dtype, force):
    force("onednn")
    torch.manual_seed(0)
    lin = Linear(32, 48)
    lin.weight.requires_grad_(trainable)
    x = torch.randn(*shape, requires_grad=True)
    params = [x, lin.bias] + ([lin.weight] if trainable else [])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = lin(x)
        want = F.linear(x, lin.weight, lin.bias)       # plain PyTorch: autocast's own bf16 GEMM
    assert y.dtype == want.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(y, want, **tol)
    for a, b in zip(grads_of(y, params), grads_of(want, params)):
        assert a.dtype == b.dtype                      # master weights keep fp32 gradients
        torch.testing.assert_close(a, b, **(dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else BF16_TOL))


@needs_onednn
@torch.no_grad()
def test_packed_weight_follows_in_place_updates(force):
    force("onednn")
    lin = Linear(16, 8).eval()
    x = torch.randn(3, 16)
    before = lin(x)
    lin.weight.add_(1.0)                 # an optimizer step, a LoRA merge, a checkpoint load ...
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lin(x), before)


@needs_onednn
@torch.no_grad()
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_post_ops_equal_their_formulas(act, force):
    from lmforge.models.layers import activation

    force("onednn")
    torch.manual_seed(0)
    lin, x, r = Linear(24, 40), torch.randn(6, 24), torch.randn(6, 40)
    torch.testing.assert_close(kernels.linear_act(x, lin, act, activation(act)),
                               activation(act)(F.linear(x, lin.weight, lin.bias)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.linear_add(x, lin, r), r + F.linear(x, lin.weight, lin.bias),
                               atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])   # Llama's projections have none
def test_stacked_qkv_equals_three_projections(dtype, bias, force, monkeypatch):
    force("onednn")
    torch.manual_seed(0)
    layers = tuple(Linear(16, 16, bias=bias) for _ in range(3))
    for m in layers:
        m.requires_grad_(False)
    x = torch.randn(9, 16, requires_grad=True)
    calls = []
    real = gemm.stacked_onednn
    monkeypatch.setattr(gemm, "stacked_onednn", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = kernels.stacked_linear(x, layers)
        want = torch.cat([F.linear(x, m.weight, m.bias) for m in layers], -1)
    # oneDNN computes bf16 only where the CPU has bf16 instructions; elsewhere plain runs (the same answer)
    assert bool(calls) == onednn.supports(x, dtype), "the stacked GEMM ran where it cannot / did not run"
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(y, want, **tol)
    torch.testing.assert_close(grads_of(y, [x])[0], grads_of(want, [x])[0], **tol)


# -- whole models: every architecture, head and method, every kernel against plain -------------
ARCH_HEADS = [("bert", "classification"), ("bert", "mlm"), ("bert", "pretraining"), ("roberta", "classification"),
              ("gpt2", "causal-lm"), ("gpt2", "scalar"), ("bert", "token-classification")]
METHODS = ["full", "freeze", "bitfit", "lora", "adapter-houlsby", "adapter-pfeiffer", "prefix-embedding",
           "prefix-layer"]


def _run_model(model, inputs, route, seed=5):
    from lmforge.models import routing

    torch.manual_seed(seed)   # the same dropout masks on both paths
    with routing.using(route):
        out = model(**inputs)
    loss = out.logits.float().pow(2).mean() + (0 if out.nsp_logits is None else out.nsp_logits.float().pow(2).mean())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return out.logits.detach(), dict(zip([n for n, p in model.named_parameters() if p.requires_grad],
                                         torch.autograd.grad(loss, trainable)))


def _model_case(model_type, head, method, dropout):
    from lmforge.adapters.methods import MethodConfig, apply_method
    from lmforge.data.batches import collate_packed, model_inputs
    from tests.test_packing import items, random_model, tiny

    config = tiny(model_type, head)
    config.hidden_dropout = config.attention_dropout = dropout
    model = random_model(config)
    spec = apply_method(model, MethodConfig(method=method, adapter_size=4, lora_r=4, lora_dropout=dropout,
                                            prefix_length=3, freeze_layers=1))
    with torch.no_grad():  # adapters start as the identity; make them do something
        for n, p in model.named_parameters():
            if ".lora_B" in n or ".adapters." in n:
                p.normal_(0, 0.3)
    model.train()
    return model, model_inputs(collate_packed(items([7, 3, 12, 5, 9]))), spec.adapter


@needs_onednn
@pytest.mark.parametrize("model_type,head", ARCH_HEADS)
@pytest.mark.parametrize("kernel", ["onednn", "linear=onednn,stacked=plain"])
def test_every_architecture_and_head_agrees_with_plain(model_type, head, kernel, force):
    model, inputs, route = _model_case(model_type, head, "full", 0.1)
    force("plain")
    want = _run_model(model, inputs, route)
    force(kernel)
    got = _run_model(model, inputs, route)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], atol=1e-4, rtol=1e-4, msg=n)
    with torch.no_grad():   # inference: post-ops and the stacked Q/K/V
        model.eval()
        force("plain")
        want = model(**inputs).logits
        force(kernel)
        torch.testing.assert_close(model(**inputs).logits, want, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_every_method_agrees_with_plain(method, model_type, force):
    head = "causal-lm" if model_type == "gpt2" else "classification"
    model, inputs, route = _model_case(model_type, head, method, 0.1)
    force("plain")
    want = _run_model(model, inputs, route)
    force("onednn")
    got = _run_model(model, inputs, route)
    assert want[1], "nothing trainable"
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], atol=1e-4, rtol=1e-4, msg=n)


@needs_onednn
@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_model_agrees_with_plain_bf16(method, force):
    # bf16 compute (autocast) through oneDNN's packed bf16 GEMMs against autocast's own F.linear
    model, inputs, route = _model_case("bert", "classification", method, 0.0)
    results = []
    # attention alike on both sides (plain): the key bias's gradient is zero up to rounding, which a
    # relative comparison would read as a difference
    for k in ("plain", "linear=onednn,stacked=onednn,attention=plain"):
        force(k)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run_model(model, inputs, route))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
    for n in ga:
        assert ga[n].dtype == torch.float32    # fp32 master weights get fp32 gradients
        rel = (ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-12)
        assert rel < 0.05, (n, float(rel))


@needs_onednn
def test_lora_training_runs_qkv_as_one_gemm(force, monkeypatch):
    # the LoRA path actually takes the one-GEMM route (a fallback to three GEMMs would also agree)
    model, inputs, route = _model_case("bert", "classification", "lora", 0.1)
    force("onednn")
    calls = []
    real = gemm.stacked_onednn
    monkeypatch.setattr(gemm, "stacked_onednn", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    _run_model(model, inputs, route)
    assert len(calls) == model.config.num_layers and all(n > 0 for n in calls), calls  # with LoRA terms


# -- choosing, caching, forcing ------------------------------------------------------------------
def test_forced_kernels_parse_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNELS", "plain")
    assert calibrate.forced() == {"linear": "plain", "stacked": "plain", "attention": "plain",
                                  "packed_attention": "plain", "add_norm": "plain", "rows_parallel": "plain",
                                  "rotate_store": "plain"}
    monkeypatch.setenv("LMFORGE_KERNELS", "compiled")
    assert calibrate.forced() == {"packed_attention": "compiled", "add_norm": "compiled", "rows_parallel": "compiled",
                                  "rotate_store": "compiled"}
    monkeypatch.setenv("LMFORGE_KERNELS", "onednn")
    assert calibrate.forced() == {"linear": "onednn", "stacked": "onednn"}
    monkeypatch.setenv("LMFORGE_KERNELS", "attention=fp32")
    assert calibrate.forced() == {"attention": "fp32"}
    monkeypatch.setenv("LMFORGE_KERNELS", "linear=onednn, stacked=plain")
    assert calibrate.forced() == {"linear": "onednn", "stacked": "plain"}
    monkeypatch.setenv("LMFORGE_KERNELS", "auto")
    assert calibrate.forced() == {}
    for bad in ("fast", "linear=mkl", "conv=plain", "linear=fp32", "attention=onednn", "packed_attention=fp32"):
        monkeypatch.setenv("LMFORGE_KERNELS", bad)
        with pytest.raises(ConfigError, match="LMFORGE_KERNELS"):
            calibrate.forced()


def test_forcing_plain_never_calls_onednn(force, monkeypatch):
    force("plain")
    monkeypatch.setattr(onednn, "gemm", lambda *a, **k: pytest.fail("oneDNN ran while plain was forced"))
    lin = Linear(64, 64)
    lin(torch.randn(300, 64)).sum().backward()


@needs_onednn
def test_choices_are_measured_once_then_cached_per_machine(cache, monkeypatch):
    measured = []

    def fake_measure(op, dtype, train, shape, prefix, buckets=tuple(calibrate.SIZES)):
        measured.append((prefix, buckets))
        return {f"{prefix}|{b}": {"kernel": "onednn" if op == "linear" else "plain", "why": "test"} for b in buckets}

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    lin = Linear(24, 40)
    with torch.no_grad():
        lin(torch.randn(3, 24))
        lin(torch.randn(2, 24))            # the same size bucket: measured already
        lin(torch.randn(700, 24))          # another size bucket: measured when first met, alone
    # at 700 rows on oneDNN: whether to split its rows across the threads, at its own row bucket
    assert measured == [("linear|float32|infer|24x40", ("t",)), ("linear|float32|infer|24x40", ("l",)),
                        ("rows_parallel|float32|infer|24x40", ("704",))]
    data = json.loads(cache.read_text())
    assert data["format"] == calibrate.FORMAT and data["machine_key"] == machine.machine_key()
    assert data["choices"]["linear|float32|infer|24x40|t"]["kernel"] == "onednn"
    assert "linear|float32|infer|24x40|s" not in data["choices"]
    measured.clear()
    CHOICES.reset()                         # a new process reads the file instead of measuring
    with torch.no_grad():
        lin(torch.randn(3, 24))
    assert len(measured) == 0
    # stale or corrupt files are ignored and rebuilt
    for spoil in (lambda d: d.update(machine_key="another-cpu"), lambda d: d.update(format=0),
                  lambda d: d["choices"]["linear|float32|infer|24x40|t"].update(kernel="mkl-from-the-future"),
                  lambda d: d["choices"]["linear|float32|infer|24x40|t"].update(kernel="fp32"),  # attention's
                  None):
        d = json.loads(cache.read_text())
        if spoil is None:
            cache.write_text("{not json")
        else:
            spoil(d)
            cache.write_text(json.dumps(d))
        CHOICES.reset()
        with torch.no_grad():
            lin(torch.randn(3, 24))
        assert len(measured) == 1, spoil
        assert json.loads(cache.read_text())["machine_key"] == machine.machine_key()
        measured.pop()


def test_machine_key_changes_with_threads_and_isa_caps(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)   # from the machine as it is (a capped shell too)
    key = machine.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert machine.machine_key() != key
    assert not ({"avx512f", "amx_bf16", "avx512_bf16"} & machine.cpu_flags())
    assert not machine.has_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert machine.machine_key() != key
    finally:
        torch.set_num_threads(threads)


def test_each_size_is_measured_with_a_budget_of_its_own(cache, monkeypatch):
    # a shape slow enough that one size's measurement spends most of the budget: the next size,
    # measured when first met, still gets measured (all sizes at once had left it to plain)
    clock = FakeClock()
    # a warm-up and 3 rounds of both kernels: 0.96 s a size, so all sizes at once reach only two
    runs = fake_kernels(monkeypatch, clock, [{"plain": 0.2, "onednn": 0.04}])
    monkeypatch.setattr(calibrate, "BUDGET_S", 1.0)
    with torch.no_grad():
        for rows in (1, 16, 128):
            assert calibrate.choose("linear", torch.device("cpu"), torch.float32, False, (24, 40), rows) == "onednn"
    assert [r for r, _ in runs] == [1, 16, 128]


def test_unmeasured_choices_are_not_cached(cache, monkeypatch):
    # a shape whose timing budget ran out runs plain in this process but is measured again next time
    monkeypatch.setattr(calibrate, "BUDGET_S", -1.0)
    lin = Linear(24, 40)
    with torch.no_grad():
        lin(torch.randn(3, 24))
    assert CHOICES.table()["linear|float32|infer|24x40|t"]["kernel"] == "plain"   # 3 rows: bucket t
    assert not any("24x40" in k for k in json.loads(cache.read_text())["choices"])


@needs_onednn
def test_real_calibration_picks_a_known_kernel_with_reasons(cache):
    out = calibrate.measure("linear", torch.float32, False, (32, 48), "p")
    assert set(out) == {"p|t", "p|s", "p|m", "p|l"}
    assert all(v["kernel"] in calibrate.KERNELS and "plain" in v["why"] for v in out.values())


class FakeClock:
    """An injected timer: time moves only when a fake kernel 'runs' (no real timing in tests)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_kernels(monkeypatch, clock, durations):
    """Candidates whose n-th measurement (call of calibrate._time) of a size takes durations[n][kernel]
    seconds per call; returns the measurements made, as (rows, n)."""
    runs, current = [], {}
    real_time = calibrate._time

    def counted_time(thunks, deadline, warm_up=True):
        n = sum(1 for r, _ in runs if r == current["rows"])
        runs.append((current["rows"], n))
        current["d"] = durations[min(n, len(durations) - 1)]
        return real_time(thunks, deadline, warm_up)     # the real loop, on the injected clock

    def candidates(op, dtype, train, shape, rows):
        def thunk(k):
            def run():
                clock.now += current["d"][k]
            return run
        current["rows"] = rows
        return {k: thunk(k) for k in durations[0]}   # the kernels the case times

    monkeypatch.setattr(calibrate, "clock", clock)
    monkeypatch.setattr(calibrate, "_candidates", candidates)
    monkeypatch.setattr(calibrate, "_time", counted_time)
    return runs


# (durations per measurement {kernel: seconds per call}, budget, expected kernel, measured twice)
MS = 1e-3
REMEASURE_CASES = [
    ([{"plain": MS, "onednn": 0.5 * MS}], 1.0, "onednn", False),            # clear win: once
    ([{"plain": MS, "onednn": 1.2 * MS}], 1.0, "plain", False),             # clear loss: once
    ([{"plain": MS, "onednn": 0.96 * MS}, {"plain": MS, "onednn": 0.8 * MS}], 1.0, "onednn", True),
    ([{"plain": MS, "onednn": 0.96 * MS}, {"plain": 0.9 * MS, "onednn": 0.99 * MS}], 1.0, "plain", True),
    ([{"plain": MS, "onednn": 0.99 * MS}, {"plain": MS, "onednn": 0.99 * MS}], 1.0, "plain", True),
    # within noise but the shape's budget is spent after one measurement: decided on it, not re-measured
    ([{"plain": MS, "onednn": 0.96 * MS}, {"plain": MS, "onednn": 2 * MS}], 0.005, "onednn", False),
]


@pytest.mark.parametrize("durations, budget, kernel, twice", REMEASURE_CASES)
def test_a_margin_within_noise_is_measured_once_more(monkeypatch, durations, budget, kernel, twice):
    clock = FakeClock()
    runs = fake_kernels(monkeypatch, clock, durations)
    monkeypatch.setattr(calibrate, "BUDGET_S", budget)
    out = calibrate.measure("linear", torch.float32, False, (32, 48), "p")
    b0 = next(iter(calibrate.SIZES))   # the first size measured
    first = out[f"p|{b0}"]
    assert first["kernel"] == kernel, first
    assert ("measured twice" in first["why"]) == twice, first
    assert [n for rows, n in runs if rows == calibrate.SIZES[b0]] == ([0, 1] if twice else [0])
    if twice:   # each kernel's best over both measurements decided
        best = {k: min(d[k] for d in durations) for k in durations[0]}
        assert f"onednn {best['onednn'] * 1e3:.3f} ms" in first["why"]
    if budget < 0.1:   # the rest of the sizes were not measured at all
        assert out["p|l"] == {"kernel": "plain", "why": "calibration budget spent", "provisional": True}


# -- device and precision ------------------------------------------------------------------------
def test_precision_and_device_resolve_as_documented(monkeypatch):
    from lmforge.kernels import precision as P

    cpu = torch.device("cpu")
    monkeypatch.setattr(machine, "has_bf16", lambda: True)
    monkeypatch.setattr(machine, "has_amx", lambda: True)
    assert P.resolve_precision("auto", cpu).name == "bf16" and "AMX" in P.resolve_precision("auto", cpu).why
    assert P.resolve_precision("fp32", cpu).name == "fp32"
    monkeypatch.setattr(machine, "has_bf16", lambda: False)
    assert P.resolve_precision("auto", cpu).name == "fp32"
    emulated = P.resolve_precision("bf16", cpu)
    assert emulated.name == "bf16" and "emulated" in emulated.why
    with pytest.raises(ConfigError, match="--precision"):
        P.resolve_precision("fp16", cpu)
    assert P.resolve_precision("bf16", cpu).dtype == torch.bfloat16
    with P.resolve_precision("bf16", cpu).autocast(cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with P.resolve_precision("fp32", cpu).autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    assert P.resolve_device("cpu") == cpu
    with pytest.raises(ConfigError, match="--device"):
        P.resolve_device("tpu")
    if not torch.cuda.is_available():
        assert P.resolve_device("auto") == cpu
        with pytest.raises(ConfigError, match="no CUDA device"):
            P.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs wherever a GPU is present")
def test_cuda_model_runs_packed_with_torchs_kernels():
    from lmforge.data.batches import collate_packed, model_inputs
    from tests.test_packing import items, random_model, tiny

    model = random_model(tiny())
    inputs = model_inputs(collate_packed(items([7, 3, 12])))
    want = model(**inputs).logits
    cuda = torch.device("cuda")
    model.to(cuda)
    got = model(**{k: v.to(cuda) if torch.is_tensor(v) else v for k, v in inputs.items()}).logits
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    assert calibrate.choose("linear", cuda, torch.float32, False, (32, 32), 10) == "plain"


# -- dropout masks and attention -----------------------------------------------------------------
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


@pytest.mark.parametrize("rows, size", [(1, "t"), (3, "t"), (4, "s"), (63, "s"), (64, "m"), (511, "m"), (512, "l")])
def test_one_row_is_a_size_of_its_own(rows, size):
    # a decode step of one sequence is a matrix-vector product: its kernel is measured at one row
    assert calibrate.bucket(rows) == size and calibrate.SIZES["t"] == 1


@pytest.mark.parametrize("kernel, grad, upcast", [("fp32", True, True), ("fp32", False, False),
                                                  ("plain", True, False), ("plain", False, False)])
def test_bf16_attention_that_trains_runs_in_the_chosen_precision(kernel, grad, upcast, monkeypatch):
    """Under bf16 autocast on a CPU, attention that needs gradients runs as the `attention` kernel
    says: fp32 (SDPA on inputs cast to fp32, the output cast back: torch's bf16 kernel took 2-6x as
    long for forward and backward at short lengths on an AMX Xeon) or plain (SDPA in bf16); without
    gradients it is always bf16. Gradients reach bf16 inputs either way."""
    monkeypatch.setenv("LMFORGE_KERNELS", f"attention={kernel}")
    calibrate.CHOICES.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 16, generator=g).bfloat16().requires_grad_(grad) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 64, dtype=torch.bfloat16)
    mask[0, ..., -5:] = torch.finfo(torch.bfloat16).min                        # row 0 ignores 5 keys
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attend(q, k, v, mask, 0.0)
    fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float()).bfloat16()
    bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, fp32 if upcast else bf16)
    assert not torch.equal(fp32, bf16)                 # the two ways differ: the test tells them apart
    if grad:
        got.float().sum().backward()
        assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
    calibrate.CHOICES.reset()


@pytest.mark.parametrize("kernel", ["fp32", "plain"])
def test_bf16_attention_with_dropout_runs_in_the_chosen_precision(kernel, monkeypatch):
    """With dropout (the by-hand path) too: fp32 on cast inputs where chosen, bf16 otherwise; the same
    dropout masks either way (keep_mask draws by element count)."""
    from lmforge.kernels import attention

    monkeypatch.setenv("LMFORGE_KERNELS", f"attention={kernel}")
    calibrate.CHOICES.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 24, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[0, ..., -5:] = False
    results = {}
    for name, fp32 in [("got", None), ("fp32", True), ("bf16", False)]:
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[name] = attend(q, k, v, mask, 0.2) if fp32 is None else \
                attention.dropout_attention(q, k, v, mask, 0.2, fp32=fp32)
    assert results["got"].dtype == torch.bfloat16
    assert torch.equal(results["got"], results[kernel if kernel == "fp32" else "bf16"])
    assert not torch.equal(results["fp32"], results["bf16"])     # the two ways differ: the test tells them apart
    torch.manual_seed(7)
    want = attention.dropout_attention(q.float(), k.float(), v.float(), mask, 0.2)  # fp32 math, same masks
    torch.testing.assert_close(results["fp32"].float(), want.bfloat16().float())
    results["got"].float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
    calibrate.CHOICES.reset()


def test_attention_precision_is_measured_per_key_count_and_cached(cache):
    """The `attention` op is calibrated like the GEMMs: each key-count bucket of a (heads, head size)
    gets plain or fp32 with the timings that decided it, written to the cache under its own key."""
    from lmforge.kernels import attention

    calibrate.CHOICES.reset()
    q, k, v = (torch.randn(2, 3, 20, 16).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attend(q, k, v, None, 0.0)
    table = json.loads(calibrate.cache_path().read_text())["choices"]
    keys = sorted(k for k in table if k.startswith("attention|"))
    assert keys == ["attention|bfloat16|train|3x16x0|s"]   # 20 keys: bucket s, the one met; no dropout
    for key in keys:
        assert table[key]["kernel"] in ("plain", "fp32")
        assert "plain" in table[key]["why"] and "fp32" in table[key]["why"]
    chosen = table["attention|bfloat16|train|3x16x0|s"]["kernel"]
    assert attention._in_fp32(q, k, v, False) == (chosen == "fp32")     # 20 keys: bucket s
    calibrate.CHOICES.reset()


def test_env_reports_the_machine_and_the_choices_for_a_models_shapes(tmp_path, monkeypatch, capsys):
    """`lmforge env --json`: the machine, what auto resolves to, and the kernel chosen for each of a
    model's shapes with the timings behind it; on a CPU where auto is bf16, attention's choice too."""
    from lmforge.cli import main
    from lmforge.models import Model, save_pretrained
    from lmforge.models.config import ModelConfig

    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LMFORGE_KERNELS", raising=False)
    CHOICES.reset()
    torch.manual_seed(0)
    model = Model(ModelConfig(vocab_size=60, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                              max_position_embeddings=128))
    save_pretrained(model, tmp_path / "tiny")
    assert main(["env", "--model", str(tmp_path / "tiny"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["cores"] >= 1 and report["machine_key"] == machine.machine_key()
    assert report["precision_auto"]["name"] == ("bf16" if machine.has_bf16() else "fp32")
    kernels = report["kernels"]
    assert any(k.startswith("linear|float32|train|32x64|") for k in kernels)
    for key, value in kernels.items():
        assert value["kernel"] in calibrate.OPS[key.split("|")[0]] and value["why"], key
    has_attention = any(k.startswith("attention|bfloat16|train|2x16x0|") for k in kernels)
    assert has_attention == any(k.startswith("attention|bfloat16|train|2x16x1|") for k in kernels)  # dropout too
    assert has_attention == machine.has_bf16()
    CHOICES.reset()


# -- the compiled packed attention (kernels/compiled.py, csrc/packed_attention.cpp) -------------
def _packed_reference(q, k, v, lengths, H, Hkv, causal):
    """Each sequence alone through SDPA in fp32, key/value heads repeated for their query heads."""
    outs, start = [], 0
    for L in lengths:
        qs, ks, vs = (t[start:start + L].float().view(L, -1, t.shape[1] // (H if t is q else Hkv)).transpose(0, 1)
                      for t in (q, k, v))                                   # [heads, L, Dh]
        ks, vs = ks.repeat_interleave(H // Hkv, 0), vs.repeat_interleave(H // Hkv, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1).reshape(L, -1))
        start += L
    return torch.cat(outs)


# the Llama recipe on a tiny config (model_type alone keeps BERT's defaults for the rest)
LLAMA = dict(model_type="llama", num_kv_heads=1, hidden_act="silu", norm="rmsnorm", ffn="glu", position_embedding="rope",
             linear_bias=False)


# post-norm LayerNorm, pre-norm LayerNorm, pre-norm RMSNorm with grouped-query heads and rotary positions
MODEL_CONFIGS = [dict(model_type="bert", head="classification"),
                 dict(model_type="gpt2", head="causal-lm", type_vocab_size=0),
                 dict(LLAMA, head="causal-lm", type_vocab_size=0)]


class _Spy:
    """The compiled library with some ops replaced (to record calls); every other op is the real one."""

    def __init__(self, real, **ops):
        self._real, self._ops = real, ops

    def __getattr__(self, name):
        return self._ops[name] if name in self._ops else getattr(self._real, name)


def _compiled_library():
    from lmforge.kernels import compiled

    lib = compiled.library()
    # not a skip: where the ISA has a build, a failed build must fail the suite
    assert lib is not None or compiled.isa() is None, compiled.status()
    return lib


PACKED_CASES = [  # heads, kv heads, head size, causal, lengths
    (4, 4, 32, False, [7, 3, 12, 5, 9, 1, 40]),
    (4, 4, 32, True, [7, 3, 12, 5, 9, 1, 40]),
    (6, 2, 64, True, [17, 1, 33, 4]),          # grouped-query attention
    (6, 3, 64, False, [2, 70]),
    (2, 1, 32, True, [1]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, Hkv, Dh, causal, lengths", PACKED_CASES)
def test_compiled_packed_attention_equals_sdpa_per_sequence(H, Hkv, Dh, causal, lengths, dtype):
    lib = _compiled_library()
    if lib is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), (H + 2 * Hkv) * Dh, generator=g).to(dtype)
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)     # views with the stream's row stride
    cu = torch.tensor([0, *lengths]).cumsum(0)
    got = lib.packed_attention(q, k, v, cu, H, Hkv, causal)
    want = _packed_reference(q, k, v, lengths, H, Hkv, causal)
    assert got.dtype == dtype and got.shape == (sum(lengths), H * Dh)
    torch.testing.assert_close(got.float(), want, **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32
                                                      else dict(atol=1e-2, rtol=1e-2)))


def test_compiled_packed_attention_refuses_bad_boundaries():
    lib = _compiled_library()
    if lib is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    q = k = v = torch.randn(10, 64)
    for cu in ([0, 4, 12], [0, 6, 3], [2, 10]):   # past the rows, falling, not from 0
        with pytest.raises(RuntimeError, match="cu_seqlens"):
            lib.packed_attention(q, k, v, torch.tensor(cu), 2, 2, False)


def test_packed_attention_is_inference_only_and_falls_back_where_nothing_is_built(force, monkeypatch):
    from lmforge.kernels import compiled

    force("packed_attention=compiled")
    q, k, v = (torch.randn(9, 64) for _ in range(3))
    cu = torch.tensor([0, 4, 9])
    if _compiled_library() is not None:
        torch.testing.assert_close(kernels.packed_attention(q, k, v, cu, 5, 2, 2, True),
                                   _packed_reference(q, k, v, [4, 5], 2, 2, True), atol=1e-5, rtol=1e-5)
    assert kernels.packed_attention(q.requires_grad_(), k, v, cu, 5, 2, 2, True) is None   # training: plain
    monkeypatch.setattr(compiled, "_state", {"library": None, "status": "not built: no compiler (test)"})
    assert kernels.packed_attention(q.detach(), k, v, cu, 5, 2, 2, True) is None
    force("plain")
    assert calibrate.forced()["packed_attention"] == "plain"


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=["bert", "gpt2", "llama"])
def test_models_at_inference_agree_with_plain_through_the_compiled_attention(config, force, monkeypatch):
    """Whole models whose head size the kernel takes (32): the compiled attention against plain, at
    inference (fp32 1e-5, bf16 autocast within BF16_TOL), and the kernel really ran."""
    calls = _through_one_kernel(config, "packed_attention", "packed_attention", force, monkeypatch)
    assert [len(c) for c in calls] == [2, 2]   # fp32, bf16: every layer


_COMPILED_OPS = ("packed_attention", "add_norm", "rows_parallel", "rotate_store")


def _through_one_kernel(config: dict, op: str, lib_op: str, force, monkeypatch, lengths=(7, 3, 33, 5, 1),
                        others: str = "") -> list[list[tuple]]:
    """A 2-layer model of `config` at inference, all plain against `op` compiled (every other compiled op
    plain; `others`: more forced choices for both runs): the same logits (fp32 1e-5, bf16 autocast within
    BF16_TOL). Returns, per dtype, the arguments of each call of the library's `lib_op`."""
    from lmforge.data.batches import collate_packed, model_inputs
    from lmforge.kernels import compiled
    from lmforge.models.config import ModelConfig
    from tests.test_packing import V, items, random_model

    if _compiled_library() is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    model = random_model(ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=96,
                                     max_position_embeddings=64, num_labels=3, hidden_dropout=0.0,
                                     attention_dropout=0.0, **config)).eval()
    inputs = model_inputs(collate_packed(items(list(lengths))))
    calls: list[tuple] = []
    real = compiled.library()
    spy = _Spy(real, **{lib_op: lambda *a: calls.append(a) or getattr(real, lib_op)(*a)})
    monkeypatch.setattr(compiled, "_state", {"library": spy, "status": "spy"})
    plain = ",".join(f"{o}=plain" for o in _COMPILED_OPS if o != op)
    per_dtype = []
    for dtype, tol in [(torch.float32, dict(atol=1e-5, rtol=1e-5)), (torch.bfloat16, BF16_TOL)]:
        outs = []
        for kernel in (f"{plain},{op}=plain", f"{plain},{op}=compiled"):
            force(",".join(filter(None, [kernel, others])))
            calls.clear()
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                outs.append(model(**inputs).logits.float())
        torch.testing.assert_close(outs[1], outs[0], **tol)
        per_dtype.append(list(calls))
    return per_dtype


def test_the_build_finds_the_ninja_package_beside_python(tmp_path, monkeypatch):
    """No ninja on PATH, the `ninja` package's beside this Python (an unactivated venv): that one is on
    PATH for the build only; with a ninja on PATH, PATH is left alone."""
    from lmforge.kernels import compiled

    (tmp_path / "ninja").write_text("")
    monkeypatch.setattr(compiled.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/nowhere")
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with compiled._with_ninja():
        assert os.environ["PATH"].split(os.pathsep) == [str(tmp_path), "/nowhere"]
    assert os.environ["PATH"] == "/nowhere"
    monkeypatch.setattr(compiled.shutil, "which", lambda name: "/usr/bin/ninja")
    with compiled._with_ninja():
        assert os.environ["PATH"] == "/nowhere"


def test_a_failed_build_is_remembered_until_recalibration(tmp_path, monkeypatch):
    """A build that fails is not retried by the next process (a broken toolchain can take seconds to
    fail), says why, and is tried again after `lmforge env --recalibrate` (forget_failures)."""
    import torch.utils.cpp_extension as ext

    from lmforge.kernels import compiled

    if compiled.isa() is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing is ever built")
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    tries = []

    def broken(**kw):
        tries.append(kw["name"])
        raise RuntimeError("Error building extension: c++: fatal error (test)")

    monkeypatch.setattr(ext, "load", broken)
    assert compiled._build() == (None, "not built: Error building extension: c++: fatal error (test)")
    lib, why = compiled._build()                      # the next process
    assert lib is None and "an earlier build failed" in why and "fatal error (test)" in why
    assert len(tries) == 1
    compiled.forget_failures()
    compiled._build()
    assert len(tries) == 2


# -- the residual add and norm -------------------------------------------------------------------
def _add_norm_reference(y, residual, weight, bias, eps, rms):
    s = residual.float() + y.float()
    if rms:
        return s, weight * (s * s.pow(2).mean(-1, keepdim=True).add(eps).rsqrt())
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("N,D,rows", [(37, 64, 40), (1, 24, 1), (5, 100, 9)])   # D past the vector width's multiples too
def test_add_norm_kernel_agrees_with_the_formula(rms, dtypes, N, D, rows):
    """norm(residual + y) and the sum, every dtype mix, LayerNorm and RMSNorm; rows past N are zero."""
    lib = _compiled_library()
    if lib is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    y_dtype, r_dtype, out_dtype = dtypes
    g = torch.Generator().manual_seed(N)
    y = (torch.randn(N, 2 * D, generator=g) * 3)[:, :D].to(y_dtype)    # rows with a stride past D
    residual = (torch.randn(N, D, generator=g) + 1).to(r_dtype)
    weight, bias = torch.randn(D, generator=g), None if rms else torch.randn(D, generator=g)
    out, s = lib.add_norm(y, residual, weight, bias, 1e-5, rms, True, out_dtype, rows)
    want_sum, want = _add_norm_reference(y, residual, weight, bias, 1e-5, rms)
    tol = dict(atol=1e-5, rtol=1e-5) if out_dtype == torch.float32 else BF16_TOL
    assert out.shape == (rows, D) and out.dtype == out_dtype and s.dtype == r_dtype
    torch.testing.assert_close(out[:N].float(), want, **tol)
    torch.testing.assert_close(s.float(), want_sum.to(r_dtype).float(), atol=0, rtol=0)   # one rounding
    assert not out[N:].any()


def test_add_norm_refuses_what_it_cannot_compute():
    lib = _compiled_library()
    if lib is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    y, w = torch.randn(4, 8), torch.randn(8)
    for args, match in [((y, torch.randn(4, 9), w, None), "both"), ((y, y, torch.randn(9), None), "weight"),
                        ((y, y, w, w), "RMSNorm"), ((y.double(), y.double(), w, None), "float32 or bfloat16")]:
        with pytest.raises(RuntimeError, match=match):
            lib.add_norm(*args, 1e-5, True, False, torch.float32, 4)
    with pytest.raises(RuntimeError, match="rows"):
        lib.add_norm(y, y, w, None, 1e-5, True, False, torch.float32, 3)


def test_add_norm_runs_the_kernel_only_at_inference(force):
    """kernels.norms.add_norm: the kernel where forced and no gradient is needed (its output in the
    autocast dtype); the formula, in its own dtypes, when training or forced plain."""
    from lmforge.kernels.norms import add_norm

    if _compiled_library() is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    norm = torch.nn.LayerNorm(48)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    y, x = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    force("add_norm=compiled")
    with torch.no_grad():
        out, s = add_norm(y, x, norm, with_sum=True)
        torch.testing.assert_close(out, norm(x + y), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, x + y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, s = add_norm(y.bfloat16(), x, norm)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape and s is None
        torch.testing.assert_close(out.float(), norm(x + y.bfloat16().float()), **BF16_TOL)
    out, _ = add_norm(y, x, norm)          # parameters that need gradients: the formula
    assert out.grad_fn is not None
    force("add_norm=plain")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert add_norm(y.bfloat16(), x, norm)[0].dtype == torch.float32   # autocast's LayerNorm


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=["bert", "gpt2", "llama"])
def test_models_at_inference_agree_with_plain_through_the_add_norm_kernel(config, force, monkeypatch):
    """Whole models (post-norm LayerNorm, pre-norm LayerNorm, pre-norm RMSNorm): the fused add and norm
    against plain at inference (fp32 1e-5, bf16 autocast within BF16_TOL), and the kernel really ran."""
    calls = _through_one_kernel(config, "add_norm", "add_norm", force, monkeypatch)
    # post-norm: after both sublayers; pre-norm: the middle sum with the FFN's norm, and the layer's output
    # with the next layer's norm (the last layer's with the final norm): 2 a layer either way
    assert [len(c) for c in calls] == [2 * 2, 2 * 2]


# -- a GEMM's rows across the threads --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("rows,parts", [(131, 2), (200, 3), (2, 4)])   # uneven parts; more parts than rows
def test_rows_parallel_gemm_agrees_with_one_call(dtype, act, rows, parts):
    """The compiled row split against one oneDNN call: the same rows, bias and post-op."""
    if not onednn.available() or not onednn.supports(torch.zeros(1), dtype):
        pytest.skip("no oneDNN (or no bf16 in it) in this torch build")
    if _compiled_library() is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(40, 48, generator=g), torch.randn(40, generator=g), torch.randn(rows, 48, generator=g)
    packed, bias = onednn.packed_weight((w,), (b,), dtype)
    want = onednn.gemm(x, packed, bias, act, dtype=dtype)
    got = onednn.gemm(x, packed, bias, act, dtype=dtype, rows_parallel=parts)
    assert got.shape == want.shape == (rows, 40) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)   # each row computed alike


def test_rows_parallel_is_chosen_per_row_bucket_and_measured_at_it(force, tmp_path, monkeypatch):
    """The op's bucket is the GEMM's own row bucket (not the four coarse sizes), and that row count is
    what the calibration times."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    force("auto")
    assert calibrate.bucket(800, "rows_parallel") == str(onednn.bucket_rows(800)) == "832"
    assert calibrate.bucket(800, "linear") == calibrate.bucket(1024, "linear") == "l"
    if not onednn.available() or _compiled_library() is None:
        pytest.skip("no oneDNN or nothing compiled here")
    seen = []
    real = calibrate._rows_parallel_candidates
    monkeypatch.setattr(calibrate, "_rows_parallel_candidates", lambda d, s, r, g: seen.append(r) or real(d, s, r, g))
    calibrate.choose("rows_parallel", torch.device("cpu"), torch.float32, False, (64, 32), 800)
    calibrate.choose("rows_parallel", torch.device("cpu"), torch.float32, False, (64, 32), 810)   # same bucket
    assert seen == [832]
    assert "rows_parallel|float32|infer|64x32|832" in calibrate.CHOICES.table()


def test_models_at_inference_agree_with_plain_through_rows_parallel(force, monkeypatch):
    """A model whose GEMMs have enough rows, forced through the row split: the same logits as one call
    per GEMM (fp32 1e-5, bf16 within BF16_TOL), and the split really ran for every oneDNN GEMM."""
    if not onednn.available() or not onednn.supports(torch.zeros(1), torch.bfloat16):
        pytest.skip("no oneDNN (or no bf16 in it) in this torch build")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = _through_one_kernel(dict(model_type="bert", head="classification"), "rows_parallel",
                                "rows_parallel_linear", force, monkeypatch, lengths=(40, 33, 50, 27, 21),  # 171 rows
                                others="linear=onednn,stacked=onednn")
    # per layer: Q/K/V, attention output, FFN in and out (the head's few rows stay one call), in 2 parts
    assert [[a[-1] for a in c] for c in calls] == [[2] * 8, [2] * 8]


# -- rotary positions and the KV cache store -----------------------------------------------------
def _rotate_store_reference(qkv, cos, sin, H, Hkv, k_rows, v_rows, index):
    """models/layers.py's rotation (in fp32) and KVCache.write's index copies."""
    from lmforge.kernels.rotary import rotate

    N, Dh = qkv.shape[0], qkv.shape[1] // (H + 2 * Hkv)
    heads = qkv.float().view(N, H + 2 * Hkv, Dh).clone()
    if cos is not None:
        heads[:, :H + Hkv] = rotate(heads[:, :H + Hkv], cos.float()[:, None], sin.float()[:, None])
    if k_rows is not None:
        k_rows.index_copy_(0, index, heads[:, H:H + Hkv].reshape(-1, Dh).to(k_rows.dtype))
        v_rows.index_copy_(0, index, heads[:, H + Hkv:].reshape(-1, Dh).to(v_rows.dtype))
    return heads.reshape(N, -1)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("rope,cache", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2), (3, 1)])
def test_rotate_store_kernel_agrees_with_the_formula(dtype, cache_dtype, rope, cache, H, Hkv):
    """Rotated Q and K heads in place, V untouched, keys and values at their cache rows, nothing else
    written; every dtype mix, grouped-query heads, rotation or cache alone."""
    lib = _compiled_library()
    if lib is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    g = torch.Generator().manual_seed(H * 10 + Hkv)
    N, Dh, slots = 7, 8, 5
    qkv = torch.randn(N, 2 * (H + 2 * Hkv) * Dh, generator=g)[:, :(H + 2 * Hkv) * Dh].to(dtype)  # strided rows
    angles = torch.randn(N, Dh, generator=g) * 3
    cos, sin = (angles.cos().to(dtype), angles.sin().to(dtype)) if rope else (None, None)
    rows = N * Hkv * slots
    index = torch.randperm(rows, generator=g)[:N * Hkv] if cache else None
    k_rows, v_rows = (torch.full((rows, Dh), 7.0, dtype=cache_dtype) for _ in range(2)) if cache else (None, None)
    want_k, want_v = (t.clone() if t is not None else None for t in (k_rows, v_rows))
    want = _rotate_store_reference(qkv, cos, sin, H, Hkv, want_k, want_v, index)
    lib.rotate_store(qkv, cos, sin, H, Hkv, k_rows, v_rows, index)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 and cache_dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(qkv.float(), want.to(dtype).float(), **tol)
    if cache:
        torch.testing.assert_close(k_rows.float(), want_k.float(), **tol)
        torch.testing.assert_close(v_rows.float(), want_v.float(), **tol)
        untouched = torch.ones(rows, dtype=torch.bool)
        untouched[index] = False
        assert (k_rows[untouched] == 7).all() and (v_rows[untouched] == 7).all()


def test_rotate_store_refuses_a_slot_outside_the_cache():
    lib = _compiled_library()
    if lib is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    qkv, k_rows, v_rows = torch.randn(2, 3 * 8), torch.zeros(4, 8), torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        lib.rotate_store(qkv, None, None, 1, 1, k_rows, v_rows, torch.tensor([1, 4]))
    assert not k_rows.any()                       # checked before anything was written
    with pytest.raises(RuntimeError, match="multiple of the heads"):
        lib.rotate_store(torch.randn(2, 25), None, None, 1, 1, None, None, None)


@pytest.mark.parametrize("config", [
    LLAMA,
    dict(model_type="gpt2"),
])
def test_decoding_through_rotate_store_agrees_with_plain(config, force, monkeypatch):
    """Greedy packed decoding of prompts of different lengths (prefill, then steps) with the compiled
    rotation and cache store against plain: the same logits every step (fp32 1e-5), and the kernel ran
    in every layer of every step."""
    from lmforge.kernels import compiled
    from lmforge.models.config import ModelConfig
    from lmforge.models.generate import RowDecoder
    from tests.test_packing import V, random_model

    if _compiled_library() is None:
        pytest.skip("no AVX2 or AVX-512 here: nothing to compile (plain runs)")
    model = random_model(ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=96,
                                     max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                                     head="causal-lm", type_vocab_size=0, **config)).eval()
    calls = []
    real = compiled.library()
    spy = _Spy(real, rotate_store=lambda *a: calls.append(a[1] is not None) or real.rotate_store(*a))
    monkeypatch.setattr(compiled, "_state", {"library": spy, "status": "spy"})
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    runs = []
    for kernel in ("plain", "rotate_store=compiled"):
        force(kernel)
        calls.clear()
        runs.append(_greedy_logits(model, prompts, 4))
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    rotary = config["model_type"] == "llama"
    assert calls == [rotary] * (model.config.num_layers * 4)   # the prefill and 3 steps, every layer


def _greedy_logits(model, prompts, steps):
    """Each step's logits [B, V] of greedy packed decoding (models/generate.py prefill and decode_step)."""
    from lmforge.models.generate import decode_step, prefill

    out = []
    with torch.no_grad():
        state, logits = prefill(model, prompts, steps)
        out.append(logits)
        for _ in range(steps - 1):
            logits = decode_step(model, state, logits.argmax(-1))
            out.append(logits)
    return out
