// A oneDNN GEMM on prepacked weights, its rows split across the threads, each part one oneDNN call on
// one thread (compiled on first use by lmforge/kernels/compiled.py).
//
// Why: for some shapes and row counts oneDNN's own split of a GEMM gives the work to one thread. On
// a 2-core AMX Xeon (torch 2.13), bf16 x [M, 1536] W^T [1536, 384] (MiniLM's FFN output) ran at
// about 1,050 GFLOP/s, one core's rate, for every M from 160 to 928 rows, and at about 2,000 from 960
// rows on; [M, 384] x [384, 384] likewise below 544 rows. Run as one part per thread (a call made
// inside a parallel region runs single-threaded), those took 1.5-2x less time, while shapes that
// oneDNN already splits well lost 25-35%: calibrate.py measures which, per shape and row bucket.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

namespace {

// the op kernels/onednn.py calls as torch.ops.mkldnn._linear_pointwise (looked up once; an error
// naming it if this torch lacks it: the Python side checks onednn.available() first)
const c10::OperatorHandle& linear_pointwise() {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  return op;
}

at::Tensor linear_part(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       const std::string& attr, const std::string& algorithm) {
  torch::jit::Stack stack;
  stack.emplace_back(x);
  stack.emplace_back(packed);
  stack.emplace_back(bias);
  stack.emplace_back(attr);
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(algorithm);
  linear_pointwise().callBoxed(&stack);
  return stack[0].toTensor();
}

// act(x W^T + b) for x [M, K] contiguous, `packed` W as kernels/onednn.py reorders it, `out_features`
// columns; rows split into `parts` nearly equal contiguous blocks, one per thread.
at::Tensor rows_parallel_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                int64_t out_features, std::string attr, std::string algorithm, int64_t parts) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K]");
  TORCH_CHECK(parts >= 1, "parts must be at least 1");
  const int64_t M = x.size(0);
  const int64_t chunk = (M + parts - 1) / parts;
  auto out = at::empty({M, out_features}, x.options());
  const bool inference = c10::InferenceMode::is_enabled();   // thread-local: the pool's threads need it too
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t lo = p * chunk, hi = std::min(M, lo + chunk);
      if (lo >= hi) continue;
      auto y = linear_part(x.narrow(0, lo, hi - lo), packed, bias, attr, algorithm);
      TORCH_CHECK(y.size(1) == out_features, "the packed weight has ", y.size(1), " outputs, not ", out_features);
      out.narrow(0, lo, hi - lo).copy_(y);   // on the thread that computed it, while it is in cache
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge_kernels, m) {
  m.def("rows_parallel_linear(Tensor x, Tensor packed, Tensor? bias, int out_features, str attr, str algorithm, "
        "int parts) -> Tensor", &rows_parallel_linear);
}
