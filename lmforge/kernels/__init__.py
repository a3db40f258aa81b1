"""Fast kernels behind one small interface, with plain PyTorch as the always-correct fallback.

models/ describes the architecture and calls only these functions for the operations that have a
faster form than their formula:

  linear(x, W, b)                 x W^T + b (at inference on oneDNN, its rows split across the
                                  threads where measured faster: compiled rows_parallel)
  linear_act(x, layer, name, f)   f(layer(x))        (activation as a GEMM post-op at inference)
  linear_add(x, layer, r)         r + layer(x)       (residual add as a GEMM post-op at inference)
  stacked_linear(x, layers)       cat([l(x) for l in layers], -1)   (Q, K, V as one GEMM; one int8
                                  GEMM when all three are int8.Int8Linear, built and cached here)
  attend(q, k, v, mask, p)        softmax(q k^T / sqrt(d) + mask) v, with dropout p
  packed_attention(q, k, v, cu, max_len, H, Hkv, causal)
                                  the same within each sequence of a packed stream (inference), or
                                  None where the compiled kernel (compiled.py) was not chosen
  keep_mask(like, p)              a dropout keep-mask
  rotate_store(qkv, rope, H, Hkv, target)
                                  rotary positions on a stream's Q and K heads and its keys and
                                  values into a KV cache, in place, at inference (rotary.py; compiled)
  add_norm(y, r, norm, with_sum)  (norm(r + y), r + y): a residual add and the LayerNorm or RMSNorm
                                  after it in one pass at inference (norms.py; compiled kernel)

Which implementation runs is chosen per machine by measurement (calibrate.py) and can be forced
with LMFORGE_KERNELS; private torch ops live only in onednn.py and int8.py, guarded; compiled.py builds lmforge's own C++
kernels (csrc/) for this CPU on first use, or reports why it could not. int8.py is the
dynamic int8 linear (infer/quantize.py decides which layers use it); precision.py resolves --device
and --precision; machine.py says what this machine is; caches.py bounds the math libraries' per-shape
caches (done here, on import, before any oneDNN primitive exists).
"""

from lmforge.kernels import caches

caches.bound()


from lmforge.kernels.attention import attend, keep_mask, packed_attention
from lmforge.kernels.gemm import LowRankWrapper, compute_dtype, linear, linear_act, linear_add, stacked_linear
from lmforge.kernels.norms import RMSNormBase, add_norm
from lmforge.kernels.precision import Precision, resolve_device, resolve_precision
from lmforge.kernels.rotary import rotate_store

__all__ = ["attend", "keep_mask", "packed_attention", "linear", "linear_act", "linear_add", "stacked_linear", "compute_dtype",
           "LowRankWrapper", "RMSNormBase", "add_norm", "rotate_store", "Precision", "resolve_device", "resolve_precision"]
