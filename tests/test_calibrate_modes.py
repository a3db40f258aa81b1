"""Calibration measures whatever mode the model's first call comes in: a first call inside
torch.inference_mode (as the server and the benchmarks make it) must time both kernels, not record
an error as the machine's choice; and a model whose weights are inference tensors still runs on the
packed kernels."""

import pytest
import torch

from lmforge.kernels import calibrate, onednn


@pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("op,shape", [("linear", (64, 96)), ("stacked", (64, 64, 64, 64))])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_calibration_inside_each_inference_mode_measures_both_kernels(op, shape, mode, monkeypatch):
    monkeypatch.setattr(calibrate, "BUDGET_S", 600.0)   # a busy machine must not run out of budget here
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        got = calibrate.measure(op, torch.float32, False, shape, "t")
    for choice in got.values():
        assert "failed" not in choice["why"], choice
        assert "onednn" in choice["why"] and "plain" in choice["why"], choice


@pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")
def test_packed_weights_of_inference_tensors():
    with torch.inference_mode():
        w, b, x = torch.randn(32, 16), torch.randn(32), torch.randn(5, 16)
        packed, bias = onednn.packed_weight((w,), (b,), torch.float32)
        y = onednn.gemm(x, packed, bias)
    torch.testing.assert_close(y, x @ w.t() + b, atol=1e-5, rtol=1e-5)


def test_a_failed_measurement_is_not_cached(monkeypatch):
    """A kernel that fails during calibration runs plain in this process, and the next process
    measures again instead of reading 'failed' from the cache."""
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this context")

    monkeypatch.setattr(calibrate, "_candidates", broken)
    got = calibrate.measure("linear", torch.float32, False, (64, 96), "t")
    assert all(c["kernel"] == "plain" and c.get("provisional") for c in got.values()), got


def test_private_ops_are_looked_up_guarded():
    from lmforge.kernels.ops import private_op
    assert private_op("aten", "mm") is not None
    assert private_op("mkldnn", "no_such_op_in_any_torch") is None
    assert private_op("no_such_namespace_here", "mm") is None
