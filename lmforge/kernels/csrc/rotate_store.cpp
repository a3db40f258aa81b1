// Rotary positions on a packed stream's query and key heads, in place, and its keys and values
// stored into a KV cache, in one pass (compiled on first use by lmforge/kernels/compiled.py).
//
// qkv [N, (H + 2 Hkv) Dh] is one Q/K/V projection of N tokens (Q heads, then K heads, then V heads).
// Each of the first H + Hkv heads is rotated by its token's (cos, sin) [N, Dh]: coordinate i is paired
// with i + Dh/2 (Hugging Face Llama's convention; kernels/rotary.py rotate()). Then, with a cache,
// key head g of token n (rotated) and its value head go to row index[n Hkv + g] of k_dst and v_dst
// [rows, Dh]. A decode step of a 30-layer model made this about a dozen small ops a layer (rotation,
// concatenations, two index copies); here it is one call, computed in fp32 and rounded once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <vector>

namespace {

template <typename T> inline float f32(T x) { return static_cast<float>(x); }

template <typename T, typename C, typename K>
void run(T* qkv, int64_t sq, const C* cos, const C* sin, int64_t sc, int64_t N, int64_t rotated, int64_t H,
         int64_t Hkv, int64_t Dh, K* k_dst, K* v_dst, const int64_t* index) {
  const int64_t half = Dh / 2;
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> c(Dh), s(Dh), x(Dh);
    for (int64_t n = begin; n < end; ++n) {
      T* row = qkv + n * sq;
      if (cos != nullptr) {
        for (int64_t i = 0; i < Dh; ++i) c[i] = f32(cos[n * sc + i]), s[i] = f32(sin[n * sc + i]);
        for (int64_t h = 0; h < rotated; ++h) {
          T* head = row + h * Dh;
          for (int64_t i = 0; i < Dh; ++i) x[i] = f32(head[i]);
          for (int64_t i = 0; i < half; ++i) {
            head[i] = static_cast<T>(x[i] * c[i] - x[i + half] * s[i]);
            head[i + half] = static_cast<T>(x[i + half] * c[i + half] + x[i] * s[i + half]);
          }
        }
      }
      if (k_dst != nullptr) {
        for (int64_t g = 0; g < Hkv; ++g) {
          const int64_t at = index[n * Hkv + g];
          const T* k = row + (H + g) * Dh;
          const T* v = row + (H + Hkv + g) * Dh;
          for (int64_t i = 0; i < Dh; ++i) k_dst[at * Dh + i] = static_cast<K>(f32(k[i]));
          for (int64_t i = 0; i < Dh; ++i) v_dst[at * Dh + i] = static_cast<K>(f32(v[i]));
        }
      }
    }
  });
}

template <typename T, typename C>
void dispatch_cache(T* q, int64_t sq, const C* c, const C* s, int64_t sc, int64_t N, int64_t rotated, int64_t H,
                    int64_t Hkv, int64_t Dh, const c10::optional<at::Tensor>& k_dst,
                    const c10::optional<at::Tensor>& v_dst, const int64_t* index) {
  if (!k_dst.has_value()) {
    run<T, C, float>(q, sq, c, s, sc, N, rotated, H, Hkv, Dh, nullptr, nullptr, nullptr);
  } else if (k_dst->scalar_type() == at::kBFloat16) {
    using K = c10::BFloat16;
    run<T, C, K>(q, sq, c, s, sc, N, rotated, H, Hkv, Dh, k_dst->data_ptr<K>(), v_dst->data_ptr<K>(), index);
  } else {
    run<T, C, float>(q, sq, c, s, sc, N, rotated, H, Hkv, Dh, k_dst->data_ptr<float>(), v_dst->data_ptr<float>(), index);
  }
}

template <typename T>
void dispatch_rope(const at::Tensor& qkv, const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                   int64_t rotated, int64_t H, int64_t Hkv, int64_t Dh, const c10::optional<at::Tensor>& k_dst,
                   const c10::optional<at::Tensor>& v_dst, const int64_t* index) {
  T* q = qkv.data_ptr<T>();
  const int64_t N = qkv.size(0), sq = qkv.stride(0);
  if (!cos.has_value()) {
    dispatch_cache<T, float>(q, sq, nullptr, nullptr, 0, N, 0, H, Hkv, Dh, k_dst, v_dst, index);
  } else if (cos->scalar_type() == at::kBFloat16) {
    using C = c10::BFloat16;
    dispatch_cache<T, C>(q, sq, cos->data_ptr<C>(), sin->data_ptr<C>(), cos->stride(0), N, rotated, H, Hkv, Dh, k_dst,
                         v_dst, index);
  } else {
    dispatch_cache<T, float>(q, sq, cos->data_ptr<float>(), sin->data_ptr<float>(), cos->stride(0), N, rotated, H, Hkv,
                             Dh, k_dst, v_dst, index);
  }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, " must be float32 or bfloat16");
}

// qkv [N, (H + 2 Hkv) Dh] rows contiguous; cos, sin [N, Dh] (or both None: no rotation); k_dst, v_dst
// [rows, Dh] contiguous with index [N Hkv] (or all None: no cache).
void rotate_store(const at::Tensor& qkv, const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                  int64_t heads, int64_t kv_heads, const c10::optional<at::Tensor>& k_dst,
                  const c10::optional<at::Tensor>& v_dst, const c10::optional<at::Tensor>& index) {
  check_float(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [N, (H + 2 Hkv) Dh] with contiguous rows");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && qkv.size(1) % (heads + 2 * kv_heads) == 0,
              "qkv's width is not a multiple of the heads");
  const int64_t N = qkv.size(0), Dh = qkv.size(1) / (heads + 2 * kv_heads);
  TORCH_CHECK(Dh % 2 == 0, "head size must be even for rotary positions");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "cos and sin come together");
  if (cos.has_value()) {
    for (const auto* t : {&*cos, &*sin}) {
      check_float(*t, "cos/sin");
      TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == Dh && t->stride(1) == 1, "cos and sin must be [N, Dh]");
    }
    TORCH_CHECK(cos->scalar_type() == sin->scalar_type() && cos->stride(0) == sin->stride(0), "cos and sin differ");
  }
  TORCH_CHECK(k_dst.has_value() == v_dst.has_value() && k_dst.has_value() == index.has_value(),
              "k_dst, v_dst and index come together");
  const int64_t* idx = nullptr;
  at::Tensor index_long;
  if (k_dst.has_value()) {
    for (const auto* t : {&*k_dst, &*v_dst}) {
      check_float(*t, "k_dst/v_dst");
      TORCH_CHECK(t->dim() == 2 && t->size(1) == Dh && t->is_contiguous(), "k_dst and v_dst must be contiguous [rows, Dh]");
    }
    TORCH_CHECK(k_dst->scalar_type() == v_dst->scalar_type() && k_dst->size(0) == v_dst->size(0), "k_dst and v_dst differ");
    index_long = index->to(at::kLong).contiguous();
    TORCH_CHECK(index_long.numel() == N * kv_heads, "index must have N * kv_heads entries");
    idx = index_long.data_ptr<int64_t>();
    const int64_t rows = k_dst->size(0);
    for (int64_t i = 0; i < index_long.numel(); ++i)   // checked before any write: a bad slot is an error, not a stray store
      TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "index ", idx[i], " is outside the cache's ", rows, " rows");
  }
  if (qkv.scalar_type() == at::kBFloat16) {
    dispatch_rope<c10::BFloat16>(qkv, cos, sin, heads + kv_heads, heads, kv_heads, Dh, k_dst, v_dst, idx);
  } else {
    dispatch_rope<float>(qkv, cos, sin, heads + kv_heads, heads, kv_heads, Dh, k_dst, v_dst, idx);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge_kernels, m) {
  m.def("rotate_store(Tensor(a!) qkv, Tensor? cos, Tensor? sin, int heads, int kv_heads, Tensor(b!)? k_dst, "
        "Tensor(c!)? v_dst, Tensor? index) -> ()", &rotate_store);
}
