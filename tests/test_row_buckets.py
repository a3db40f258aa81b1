"""The oneDNN GEMMs pad their rows to a few bucket sizes (kernels/onednn.py) so that a process meets a
bounded number of shapes (memory levelled off instead of growing with each new token count). Padding
must never change a result, forward or backward, and the buckets must stay few and tight."""

import pytest
import torch

from lmforge.kernels import onednn

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")


def test_buckets_are_few_tight_and_cover_every_count():
    sizes = [onednn.bucket_rows(m) for m in range(1, 8193)]
    assert all(b >= m for m, b in zip(range(1, 8193), sizes))
    assert max(b / m for m, b in zip(range(1, 8193), sizes)) <= 1.125
    assert sizes[:onednn.EXACT_ROWS] == list(range(1, onednn.EXACT_ROWS + 1))   # small batches exact
    assert len(set(sizes)) <= onednn.EXACT_ROWS + onednn.STEPS_PER_OCTAVE * 8   # 8 octaves above 32
    assert sizes == sorted(sizes)


@needs_onednn
@pytest.mark.parametrize("rows", [33, 37, 100, 1001])
def test_padded_gemms_equal_the_plain_ones(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    other = torch.randn(rows, 40, generator=g)
    want = x @ w.t() + b
    packed, bias = onednn.packed_weight((w,), (b,), torch.float32)
    y = onednn.gemm(x, packed, bias)
    assert y.shape == (rows, 40)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-5)
    if onednn._BINARY is not None:
        torch.testing.assert_close(onednn.gemm_add(x, packed, bias, other), want + other, atol=1e-4, rtol=1e-5)
    gy = torch.randn(rows, 40, generator=g)
    torch.testing.assert_close(onednn.weight_grad(gy, x), gy.t() @ x, atol=1e-3, rtol=1e-5)
    x_wide = torch.randn(rows, 96, generator=g)   # in > out: the other packing of the weight gradient
    torch.testing.assert_close(onednn.weight_grad(gy, x_wide), gy.t() @ x_wide, atol=1e-3, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("rows", [7, 33, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gemm_casts_its_input_as_it_pads_it(rows, dtype):
    """An fp32 input read by its strides (here a transposed view), cast to the compute dtype and padded
    to its row bucket in one copy: the answer is the product in that dtype."""
    if not onednn.supports(torch.randn(2, 2), dtype):
        pytest.skip("no bf16 GEMM in this CPU's oneDNN (such CPUs compute in fp32: the fp32 case runs)")
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(48, rows, generator=g).t(), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    packed, bias = onednn.packed_weight((w,), (b,), dtype)
    y = onednn.gemm(x, packed, bias, dtype=dtype)
    assert y.dtype == dtype and y.shape == (rows, 40)
    want = x.to(dtype).float() @ w.to(dtype).float().t() + b.to(dtype).float()
    torch.testing.assert_close(y.float(), want, **(dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32
                                                   else dict(atol=0.1, rtol=2e-2)))


@needs_onednn
@pytest.mark.parametrize("rows", [33, 100])
def test_a_gemm_reads_a_padded_view_without_copying_and_right(rows, monkeypatch):
    """An input that is the first rows of a bigger buffer (an earlier GEMM's padded output, or any row
    slice with room after it) is read in place, from where it starts; the answer is as from a copy."""
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    w2, b2 = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x = torch.randn(rows, 48, generator=g)
    packed, bias = onednn.packed_weight((w,), (b,), torch.float32)
    packed2, bias2 = onednn.packed_weight((w2,), (b2,), torch.float32)
    y = onednn.gemm(x, packed, bias)                       # [:rows] of its padded output
    buffer = torch.randn(rows + 64, 40, generator=g)
    middle = buffer[10:10 + rows]
    middle.copy_(y)                                        # rows after it: other data
    copies = []
    real_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: copies.append(a) or real_empty(t, *a, **k))
    for inp in (y, middle):
        torch.testing.assert_close(onednn.gemm(inp, packed2, bias2), (x @ w.t() + b) @ w2.t() + b2, atol=1e-3, rtol=1e-4)
    assert copies == []
