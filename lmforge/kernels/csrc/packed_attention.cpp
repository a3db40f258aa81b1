// Attention over a packed stream of variable-length sequences, for CPUs (compiled on first use by
// lmforge/kernels/compiled.py, for the vector ISA of the machine it runs on).
//
// softmax(q k^T / sqrt(Dh) [+ causal mask]) v for each sequence b and query head h, reading q, k
// and v straight from the stream's rows (no padding, no gather into a [B, H, T, Dh] layout) and
// writing [N, H Dh]. At the sequence lengths of sentence classification (tens of tokens) torch's
// flash kernel spends most of its time on per-(sequence, head) set-up; here each (sequence, head)
// is a few register-tiled loops: keys transposed into fp32 once, then R query rows at a time
// against VS keys at a time, the scores kept in fp32, the softmax vectorized, and R rows of the
// output accumulated against each value row. Inference only (no backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VS = Vec::size();
constexpr int64_t R = 4;  // query rows per register tile

int64_t round_up(int64_t n) { return (n + VS - 1) / VS * VS; }

// c [R, VS] = a [R, K] b [K, VS] (row strides ab, bb, cb): R rows x VS columns accumulated in registers,
// each row of b loaded once for all R rows
inline void tile(const float* a, int64_t ab, const float* b, int64_t bb, int64_t K, float* c, int64_t cb) {
  Vec acc[R];
  for (int64_t r = 0; r < R; ++r) acc[r] = Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    const Vec bk = Vec::loadu(b + k * bb);
    for (int64_t r = 0; r < R; ++r) acc[r] = at::vec::fmadd(Vec(a[r * ab + k]), bk, acc[r]);
  }
  for (int64_t r = 0; r < R; ++r) acc[r].store(c + r * cb);
}

// q [N, *] row stride sq, head h at columns h Dh; k, v likewise with Hkv heads; cu [B + 1].
template <typename T>
void attend(const T* q, int64_t sq, const T* k, int64_t sk, const T* v, int64_t sv, const int64_t* cu,
            int64_t B, int64_t H, int64_t Hkv, int64_t Dh, bool causal, int64_t max_len, T* out) {
  const int64_t group = H / Hkv, Lmax = round_up(max_len);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kT(Dh * Lmax), vf(Lmax * Dh), qf(R * Dh), s(R * Lmax), o(R * Dh);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / group;
      const int64_t start = cu[b], L = cu[b + 1] - start, Lp = round_up(L);
      const T* kb = k + start * sk + g * Dh;
      const T* vb = v + start * sv + g * Dh;
      // keys transposed [Dh, Lp] and values [Lp, Dh] in fp32, zero past L
      for (int64_t j = 0; j < Lp; ++j) {
        for (int64_t d = 0; d < Dh; ++d) kT[d * Lp + j] = j < L ? static_cast<float>(kb[j * sk + d]) : 0.f;
        for (int64_t d = 0; d < Dh; ++d) vf[j * Dh + d] = j < L ? static_cast<float>(vb[j * sv + d]) : 0.f;
      }
      for (int64_t i0 = 0; i0 < L; i0 += R) {
        const int64_t rows = std::min(R, L - i0);
        for (int64_t r = 0; r < R; ++r) {  // a short last tile repeats its last row (not written out)
          const T* qr = q + (start + i0 + std::min(r, rows - 1)) * sq + h * Dh;
          for (int64_t d = 0; d < Dh; ++d) qf[r * Dh + d] = static_cast<float>(qr[d]) * scale;
        }
        const int64_t keys = causal ? std::min(L, i0 + R) : L;  // keys any row of the tile sees
        const int64_t kp = round_up(keys);
        for (int64_t jb = 0; jb < kp; jb += VS)  // scores [R, kp] = qf [R, Dh] kT [Dh, kp]
          tile(qf.data(), Dh, kT.data() + jb, Lp, Dh, s.data() + jb, Lmax);
        for (int64_t r = 0; r < R; ++r) {  // softmax of each row over the keys it may see
          float* sr = s.data() + r * Lmax;
          const int64_t n = causal ? std::min(i0 + r + 1, L) : L;
          std::fill(sr + n, sr + kp, -INFINITY);
          const float m = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, sr, kp);
          at::vec::map([m](Vec x) { return (x - Vec(m)).exp_u20(); }, sr, sr, kp);
          const float sum = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sr, kp);
          at::vec::map([sum](Vec x) { return x * Vec(1.f / sum); }, sr, sr, kp);
        }
        for (int64_t db = 0; db < Dh; db += VS)  // out [R, Dh] = p [R, keys] v [keys, Dh]
          tile(s.data(), Lmax, vf.data() + db, Dh, keys, o.data() + db, Dh);
        for (int64_t r = 0; r < rows; ++r) {
          T* orow = out + (start + i0 + r) * (H * Dh) + h * Dh;
          for (int64_t d = 0; d < Dh; ++d) orow[d] = static_cast<T>(o[r * Dh + d]);
        }
      }
    }
  });
}

template <typename T>
T* ptr(const at::Tensor& t) { return t.data_ptr<T>(); }

at::Tensor packed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                            int64_t heads, int64_t kv_heads, bool causal) {
  const int64_t N = q.size(0), Dh = q.size(1) / heads;
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.dim() == 2, "q, k, v must be [N, heads * head size]");
  TORCH_CHECK(q.stride(1) == 1 && k.stride(1) == 1 && v.stride(1) == 1, "q, k, v rows must be contiguous");
  TORCH_CHECK(q.size(1) == heads * Dh && k.size(1) == kv_heads * Dh && v.size(1) == kv_heads * Dh &&
              k.size(0) == N && v.size(0) == N && heads % kv_heads == 0, "q, k, v shapes do not match the heads");
  TORCH_CHECK(Dh % VS == 0, "head size ", Dh, " is not a multiple of the vector width ", VS);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(q.device().is_cpu(), "CPU tensors only");
  auto cu = cu_seqlens.to(at::kLong).contiguous();
  auto out = at::empty({N, heads * Dh}, q.options());
  const int64_t B = cu.numel() - 1;
  const int64_t* c = cu.data_ptr<int64_t>();
  int64_t max_len = 0;  // from cu_seqlens itself: the buffers are sized by it
  TORCH_CHECK(B >= 0 && (B == 0 ? N == 0 : c[0] == 0 && c[B] == N), "cu_seqlens must run from 0 to N = ", N);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(c[b + 1] >= c[b], "cu_seqlens must not fall (at ", b, ")");
    max_len = std::max(max_len, c[b + 1] - c[b]);
  }
  if (q.scalar_type() == at::kBFloat16) {
    using T = c10::BFloat16;
    attend<T>(ptr<T>(q), q.stride(0), ptr<T>(k), k.stride(0), ptr<T>(v), v.stride(0), cu.data_ptr<int64_t>(), B,
              heads, kv_heads, Dh, causal, max_len, ptr<T>(out));
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "float32 or bfloat16 only");
    attend<float>(ptr<float>(q), q.stride(0), ptr<float>(k), k.stride(0), ptr<float>(v), v.stride(0),
                  cu.data_ptr<int64_t>(), B, heads, kv_heads, Dh, causal, max_len, ptr<float>(out));
  }
  return out;
}

int64_t vector_width() { return VS; }

}  // namespace

TORCH_LIBRARY(lmforge_kernels, m) {
  m.def("packed_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int heads, int kv_heads, bool causal) "
        "-> Tensor", &packed_attention);
  m.def("vector_width() -> int", &vector_width);
}
