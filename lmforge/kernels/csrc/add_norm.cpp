// A residual add and the normalisation after it in one pass over the rows, for CPUs (compiled on
// first use by lmforge/kernels/compiled.py).
//
// out = norm(residual + y), norm a LayerNorm (weight, optional bias) or an RMSNorm (weight), the
// statistics in fp32 whatever the inputs' dtypes. Optionally the sum itself too (a pre-norm block
// carries it on as its residual). At inference this replaces an add (mixed bf16 + fp32 in a bf16
// pass), a LayerNorm and the cast of its output for the next GEMM: three passes over [N, D] by one.
// `rows` >= N rows are allocated for the output and the rows past N are zero, so that a GEMM that
// pads its input to a row bucket reads this buffer in place (kernels/onednn.py _pad_rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VS = Vec::size();

inline void load(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void load(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;  // exact: bf16 is fp32's top half
}
inline void store(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store(const float* src, c10::BFloat16* dst, int64_t n) {
  at::vec::convert(src, dst, n);  // round to nearest even, as torch casts
}

// sum of f(x[d]) over d < n: VS lanes, then the lanes (a vector reduction the compiler may not
// reorder into by itself)
template <typename F>
inline float reduce(const float* x, int64_t n, F f) {
  Vec acc(0.f);
  int64_t d = 0;
  for (; d + VS <= n; d += VS) acc = acc + f(Vec::loadu(x + d));
  float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  if (d < n) {
    float lanes[VS];
    f(Vec::loadu(x + d, n - d)).store(lanes, n - d);
    for (int64_t i = 0; i < n - d; ++i) total += lanes[i];
  }
  return total;
}

// rows [0, N) of y [N, D] (row stride sy) and residual (sr) -> out [N, D] contiguous (and sum [N, D])
template <typename TY, typename TR, typename TO>
void run(const TY* y, int64_t sy, const TR* res, int64_t sr, const float* w, const float* b, double eps, bool rms,
         int64_t N, int64_t D, TO* out, TR* sum) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> s(D), t(D);
    for (int64_t i = begin; i < end; ++i) {
      load(y + i * sy, s.data(), D);
      load(res + i * sr, t.data(), D);
      at::vec::map2([](Vec a, Vec c) { return a + c; }, s.data(), s.data(), t.data(), D);
      if (sum != nullptr) store(s.data(), sum + i * D, D);
      const float mean = rms ? 0.f : reduce(s.data(), D, [](Vec x) { return x; }) / D;
      const Vec m(mean);
      // centred second pass, as torch's LayerNorm: no cancellation
      const float var = reduce(s.data(), D, [m](Vec x) { return (x - m) * (x - m); }) / D;
      const Vec rstd(1.f / std::sqrt(var + static_cast<float>(eps)));
      if (b != nullptr) {
        at::vec::map3([m, rstd](Vec x, Vec wv, Vec bv) { return (x - m) * rstd * wv + bv; }, t.data(), s.data(), w, b, D);
      } else {
        at::vec::map2([m, rstd](Vec x, Vec wv) { return (x - m) * rstd * wv; }, t.data(), s.data(), w, D);
      }
      store(t.data(), out + i * D, D);
    }
  });
}

template <typename TY, typename TR>
void dispatch_out(const at::Tensor& y, const at::Tensor& res, const float* w, const float* b, double eps, bool rms,
                  at::Tensor& out, at::Tensor* sum) {
  const int64_t N = y.size(0), D = y.size(1);
  TR* s = sum != nullptr ? sum->data_ptr<TR>() : nullptr;
  if (out.scalar_type() == at::kBFloat16) {
    run(y.data_ptr<TY>(), y.stride(0), res.data_ptr<TR>(), res.stride(0), w, b, eps, rms, N, D,
        out.data_ptr<c10::BFloat16>(), s);
  } else {
    run(y.data_ptr<TY>(), y.stride(0), res.data_ptr<TR>(), res.stride(0), w, b, eps, rms, N, D, out.data_ptr<float>(), s);
  }
}

std::tuple<at::Tensor, at::Tensor> add_norm(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias, double eps, bool rms, bool with_sum,
                                            at::ScalarType out_dtype, int64_t rows) {
  TORCH_CHECK(y.dim() == 2 && residual.sizes() == y.sizes(), "y and residual must both be [N, D]");
  TORCH_CHECK(y.stride(1) == 1 && residual.stride(1) == 1, "y and residual rows must be contiguous");
  const int64_t N = y.size(0), D = y.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "weight must be float32 [D]");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == D && bias->scalar_type() == at::kFloat &&
                            bias->is_contiguous()), "bias must be float32 [D]");
  TORCH_CHECK(!(rms && has_bias), "an RMSNorm has no bias");
  TORCH_CHECK(rows >= N, "rows (", rows, ") must be at least N (", N, ")");
  TORCH_CHECK(y.device().is_cpu() && residual.device().is_cpu(), "CPU tensors only");
  for (auto dt : {y.scalar_type(), residual.scalar_type(), out_dtype})
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "float32 or bfloat16 only");
  auto out = at::empty({rows, D}, y.options().dtype(out_dtype));
  if (rows > N) out.narrow(0, N, rows - N).zero_();
  at::Tensor sum = with_sum ? at::empty({N, D}, residual.options()) : at::Tensor();
  at::Tensor* sp = with_sum ? &sum : nullptr;
  const float* w = weight.data_ptr<float>();
  const float* b = has_bias ? bias->data_ptr<float>() : nullptr;
  const bool ybf = y.scalar_type() == at::kBFloat16, rbf = residual.scalar_type() == at::kBFloat16;
  if (ybf && rbf) dispatch_out<c10::BFloat16, c10::BFloat16>(y, residual, w, b, eps, rms, out, sp);
  else if (ybf) dispatch_out<c10::BFloat16, float>(y, residual, w, b, eps, rms, out, sp);
  else if (rbf) dispatch_out<float, c10::BFloat16>(y, residual, w, b, eps, rms, out, sp);
  else dispatch_out<float, float>(y, residual, w, b, eps, rms, out, sp);
  return {out, sum};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge_kernels, m) {
  m.def("add_norm(Tensor y, Tensor residual, Tensor weight, Tensor? bias, float eps, bool rms, bool with_sum, "
        "ScalarType out_dtype, int rows) -> (Tensor, Tensor)", &add_norm);
}
