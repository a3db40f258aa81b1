"""Which kernel runs each op, chosen by measuring the candidates on this machine, and remembered.

The first time an op meets a weight shape at a size (per device, compute dtype, and inference or
training), every candidate kernel is timed on that shape at that size bucket's token count (1, 16, 128
or 1,024 rows: a decode step of one sequence, batch-1 latency or a decode step of a batch, a short
batch, a full batch) and the fastest is kept for the bucket. Each bucket is measured when first met,
with a budget of its own: measuring all four at once had run a large shape's budget out (SmolLM2's
[49152, 576] output matrix), leaving its later sizes to plain, which in bf16 casts that weight on
every call (37 against 6 ms a decode step). One row is a bucket of its own because a GEMM of one row is a
matrix-vector product, bound by reading the weight: packed oneDNN, ahead from 16 rows up, took 1.3-2x
plain's time at one row on the AMX Xeon (SmolLM2's shapes, one thread). A fast path must
beat plain PyTorch by MARGIN to be chosen, so noise never picks a slower kernel. Timing one shape
at one size takes tens of milliseconds (bounded by BUDGET_S); a model has a handful of shapes.

Choices are cached in `<cache dir>/kernels.json` (LMFORGE_CACHE_DIR, else $XDG_CACHE_HOME/lmforge,
else ~/.cache/lmforge) under a key of the CPU model, ISA flags, thread count and torch version
(kernels/machine.py). A file that does not parse, has another format version or another machine key,
or names an unknown kernel is ignored and rebuilt, never trusted. LMFORGE_KERNELS forces a choice:
`plain` (everything plain PyTorch), `onednn`, or per op, e.g. `linear=onednn,stacked=plain`.

Ops and their kernels: `linear` and `stacked` (Q/K/V as one GEMM) are plain (F.linear) or onednn
(prepacked weights; int8 and bf16 through the same primitive), keyed by weight shape and row count.
`packed_attention` is inference attention over a packed stream: plain (per length bucket, SDPA) or
compiled (kernels/compiled.py: built for this CPU on first use; unavailable where nothing can be
built), keyed by (heads, key/value heads, head size, causal) and the longest sequence.
`rows_parallel` is an inference GEMM that runs on oneDNN: one call (plain), or its rows split across
the threads, one single-threaded oneDNN call each (compiled; csrc/rows_parallel.cpp), keyed by weight
shape and the GEMM's own row bucket (onednn.bucket_rows, measured at that many rows: oneDNN's split
of some bf16 shapes changed within an octave of rows on the AMX Xeon).
`rotate_store` is inference's rotary positions on a packed stream's Q and K heads and the store of its
keys and values into a KV cache (kernels/rotary.py): plain (rotary.rotate_stream and two index copies)
or compiled (one pass), keyed by (heads, key/value heads, head size, rotary or not, cache or not) and rows.
`add_norm` is inference's residual add and the LayerNorm or RMSNorm after it (kernels/norms.py): plain
(add, norm, cast for the next GEMM) or compiled (one pass), keyed by (width, RMSNorm or not) and rows.
`attention` is a bf16 training step's attention on a CPU (forward and backward): plain (in bf16) or
fp32 (on inputs cast to fp32, the output cast back), keyed by (heads, head size, dropout or not) and
key count: SDPA without dropout, the by-hand path with it (which ran 15-20% faster in fp32 at 20-30 keys
on the AMX Xeon, casts included). torch 2.13's bf16 kernel took 2-6x fp32's time at short lengths on an AMX Xeon
and won only near 512 keys, and where the crossing lies depends on the CPU, so it is measured too.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.kernels import machine, onednn

log = logging.getLogger(__name__)

FORMAT = 8                  # bump when the file's meaning changes: older files are rebuilt (8: rotate_store)
OPS = {"linear": ("plain", "onednn"), "stacked": ("plain", "onednn"), "attention": ("plain", "fp32"),
       "packed_attention": ("plain", "compiled"), "add_norm": ("plain", "compiled"),
       "rows_parallel": ("plain", "compiled"), "rotate_store": ("plain", "compiled")}
KERNELS = ("plain", "onednn", "fp32", "compiled")
NOT_GEMM = ("attention", "packed_attention", "add_norm", "rotate_store")   # ops whose fast path does not need oneDNN
EXACT_ROWS = ("rows_parallel",)   # ops bucketed by the GEMMs' own row buckets, each measured at its row count
SIZES = {"t": 1, "s": 16, "m": 128, "l": 1024}   # bucket -> rows (attention: keys) timed
MARGIN = 0.97               # a fast path must take at most 97% of plain's time
BUDGET_S = 1.0              # per (op, shape): stop timing and keep plain past this
NOISE = 0.05                # a ratio to plain this close to MARGIN is measured once more (budget allowing)
clock = time.perf_counter   # the timer (tests inject their own)


def bucket(rows: int, op: str = "") -> str:
    if op in EXACT_ROWS:   # where the kernel wins changes within an octave: per row bucket
        return str(onednn.bucket_rows(rows))
    return "t" if rows < 4 else "s" if rows < 64 else "m" if rows < 512 else "l"


def cache_path() -> Path:
    root = os.environ.get("LMFORGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lmforge")
    return Path(root) / "kernels.json"


def forced() -> dict[str, str]:
    """LMFORGE_KERNELS as {op: kernel}; {} when unset or auto. A bad value is an error, not a guess."""
    from lmforge.errors import ConfigError

    spec = os.environ.get("LMFORGE_KERNELS", "").strip()
    if spec in ("", "auto"):
        return {}
    out = {}
    for part in spec.split(","):
        op, _, kernel = part.strip().rpartition("=")
        if kernel not in KERNELS or (op and (op not in OPS or kernel not in OPS[op])):
            raise ConfigError(f"LMFORGE_KERNELS={spec!r}: expected auto, one of {', '.join(KERNELS)}, or "
                              f"op=kernel with " + "; ".join(f"{o}: {'|'.join(k)}" for o, k in OPS.items())
                              + f"; got {part.strip()!r}")
        for o in ([op] if op else [o for o, ks in OPS.items() if kernel in ks]):
            out[o] = kernel
    return out


class Choices:
    """The process-wide table of choices, backed by the cache file."""

    def __init__(self):
        self._lock = threading.RLock()
        self._table: dict[str, dict] | None = None
        self._forced: dict[str, str] | None = None
        # (op, dtype, train, shape, bucket) -> kernel, read without the lock: a decode step asks
        # hundreds of times, and building the table's string key each time cost 5% of one
        self._memo: dict[tuple, str] = {}

    def reset(self) -> None:
        """Forget the table and LMFORGE_KERNELS (tests; a changed environment)."""
        with self._lock:
            self._table, self._forced, self._memo = None, None, {}

    def forget(self) -> None:
        """Drop every cached choice (this process and the file): the next use measures again."""
        with self._lock:
            self._table, self._forced, self._memo = {}, None, {}
            self._save()

    def _load(self) -> dict[str, dict]:
        path = cache_path()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if (not isinstance(data, dict) or data.get("format") != FORMAT
                    or data.get("machine_key") != machine.machine_key()):
                raise ValueError("another format or machine")
            table = data["choices"]
            if not isinstance(table, dict) or not all(
                    isinstance(v, dict) and v.get("kernel") in OPS.get(str(k).split("|")[0], ())
                    for k, v in table.items()):
                raise ValueError("an unknown kernel")
            return table
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.info("kernel cache %s ignored (%s): measuring again", path, e)
            return {}

    def _save(self) -> None:
        path = cache_path()
        data = {"format": FORMAT, "machine_key": machine.machine_key(), "machine": machine.info(),
                "choices": {k: v for k, v in self._table.items() if not v.get("provisional")}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)   # readers see the old file or the new one, never half of one
        except OSError as e:        # a read-only home: the choices still hold for this process
            log.info("kernel cache %s not written (%s)", path, e)

    def forced(self, op: str) -> str | None:
        """The kernel LMFORGE_KERNELS forces for op, or None."""
        with self._lock:
            if self._forced is None:
                self._forced = forced()
            return self._forced.get(op)

    def table(self) -> dict[str, dict]:
        with self._lock:
            if self._table is None:
                self._table = self._load()
            return self._table

    def choose(self, op: str, device: torch.device, dtype: torch.dtype, train: bool,
               shape: tuple[int, ...], rows: int) -> str:
        """The kernel for op on a weight of `shape` ([in, out...]) with `rows` input rows (attention:
        shape (heads, head size, dropout), rows = keys; packed_attention: shape (heads, key/value heads, head
        size, causal), rows = the longest sequence; add_norm: shape (width, rms), rows = rows)."""
        if device.type != "cpu" or (op not in NOT_GEMM and not onednn.available()):
            return "plain"                       # GPUs: torch's own kernels are the fast path
        memo_key = (op, dtype, train, shape, bucket(rows, op))
        kernel = self._memo.get(memo_key)
        if kernel is not None:
            return kernel
        with self._lock:
            kernel = self.forced(op)
            if kernel is None:
                prefix = f"{op}|{str(dtype).removeprefix('torch.')}|{'train' if train else 'infer'}|" \
                         f"{'x'.join(map(str, shape))}"
                table = self.table()
                key = f"{prefix}|{memo_key[-1]}"
                if key not in table:   # this size only, when first met: each size gets the whole budget
                    table.update(measure(op, dtype, train, shape, prefix, (memo_key[-1],)))
                    self._save()
                kernel = table[key]["kernel"]
            self._memo[memo_key] = kernel
            return kernel


CHOICES = Choices()


def choose(op: str, device: torch.device, dtype: torch.dtype, train: bool, shape: tuple[int, ...],
           rows: int) -> str:
    return CHOICES.choose(op, device, dtype, train, shape, rows)


# -- measuring ---------------------------------------------------------------------------------
def _time(thunks: dict, deadline: float, warm_up: bool = True) -> dict[str, float]:
    """Seconds per call of each thunk: the fastest of up to 7 rounds after a warm-up, the candidates
    interleaved within each round, so a slow spell of a busy machine hits them alike (the minimum is
    the estimate least moved by other work on the machine)."""
    if warm_up:
        for fn in thunks.values():
            fn()
    best = {k: float("inf") for k in thunks}
    for i in range(7):
        for k, fn in thunks.items():
            t = clock()
            fn()
            best[k] = min(best[k], clock() - t)
        if clock() > deadline and i >= 2:
            break
    return best


def _decide(times: dict[str, float]) -> tuple[str, bool]:
    """(kernel, close): the fastest kernel where it takes at most MARGIN of plain's time, else plain;
    close when some candidate's ratio to plain lies within NOISE of MARGIN, so that the noise of one
    measurement could have decided."""
    best = min(times, key=times.get)
    kernel = best if times[best] <= MARGIN * times["plain"] else "plain"
    close = any(abs(t / times["plain"] - MARGIN) <= NOISE for k, t in times.items() if k != "plain")
    return kernel, close


def _candidates(op: str, dtype: torch.dtype, train: bool, shape: tuple[int, ...], rows: int) -> dict:
    """{kernel: a thunk running op once} on random tensors of the real shapes. Weights are fp32
    masters and inputs fp32 (bf16 compute runs under autocast), as in a model."""
    from lmforge.kernels import gemm as K

    g = torch.Generator().manual_seed(0)
    if op == "attention":
        return _attention_candidates(dtype, train, shape, rows, g)
    if op == "packed_attention":
        return _packed_attention_candidates(dtype, shape, rows, g)
    if op == "add_norm":
        return _add_norm_candidates(dtype, shape, rows, g)
    if op == "rows_parallel":
        return _rows_parallel_candidates(dtype, shape, rows, g)
    if op == "rotate_store":
        return _rotate_store_candidates(dtype, shape, rows, g)
    k_in, outs = shape[0], shape[1:]
    weights = [torch.randn(o, k_in, generator=g) * 0.02 for o in outs]
    biases = [torch.zeros(o) for o in outs]
    if train and op == "linear":          # training a weight: its gradient is computed too
        for t in weights + biases:
            t.requires_grad_(True)
    x = torch.randn(rows, k_in, generator=g, requires_grad=train)
    gy = torch.randn(rows, sum(outs), generator=g)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def run(kernel):
        def thunk():
            with torch.set_grad_enabled(train), autocast:
                if op == "linear":
                    y = K.linear(x, weights[0], biases[0], kernel=kernel)
                else:
                    y = K.stacked_plain(x, weights, biases) if kernel == "plain" else \
                        K.stacked_onednn(x, tuple(weights), tuple(biases), ())
            if train:
                y.backward(gy.to(y.dtype))
                x.grad = None
                for t in weights + biases:
                    t.grad = None
        return thunk

    return {k: run(k) for k in OPS[op]}


def _attention_candidates(dtype: torch.dtype, train: bool, shape: tuple[int, ...], keys: int, g) -> dict:
    """Self-attention of sequences of `keys` tokens, 512 tokens in all (a batch's worth; at least one
    sequence), [B, H, keys, Dh] in `dtype` with an additive padding mask (what packed batches pass),
    forward and (training) backward, as plain and as fp32: SDPA, or with dropout (shape's third
    field) the by-hand path with its dropout masks."""
    from lmforge.kernels import attention as A

    H, Dh, dropout = shape
    B = max(1, 512 // keys)
    q, k, v = (torch.randn(B, H, keys, Dh, generator=g).to(dtype).requires_grad_(train) for _ in range(3))
    mask = torch.zeros(B, 1, 1, keys, dtype=dtype)
    gy = torch.randn(B, H, keys, Dh, generator=g).to(dtype)

    def run(kernel):
        def thunk():
            with torch.set_grad_enabled(train):
                y = A.dropout_attention(q, k, v, mask, 0.1, fp32=kernel == "fp32") if dropout else \
                    A.sdpa(q, k, v, mask, False, fp32=kernel == "fp32")
            if train:
                y.backward(gy)
                q.grad = k.grad = v.grad = None
        return thunk

    return {k: run(k) for k in OPS["attention"]}


def _packed_attention_candidates(dtype: torch.dtype, shape: tuple[int, ...], keys: int, g) -> dict:
    """Inference attention over a packed stream of sequences of `keys` tokens, 512 tokens in all: plain
    (the stream as a [B, H, keys, Dh] view, key/value heads repeated for their query heads, SDPA with a
    boolean mask, as models/layers.py runs a length bucket) and compiled (csrc/packed_attention.cpp on
    the stream's rows). A RuntimeError when the compiled kernels are not available here."""
    from lmforge.kernels import compiled

    H, Hkv, Dh, causal = shape
    lib = compiled.library()
    if lib is None:
        raise RuntimeError(f"compiled kernels {compiled.status()}")
    if Dh % compiled.vector_width():
        raise RuntimeError(f"head size {Dh} is not a multiple of the vector width {compiled.vector_width()}")
    B = max(1, 512 // keys)
    qkv = torch.randn(B * keys, (H + 2 * Hkv) * Dh, generator=g).to(dtype)
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    cu = torch.arange(B + 1) * keys
    mask = torch.ones(B, 1, keys if causal else 1, keys, dtype=torch.bool)
    if causal:
        mask = mask.tril()

    def plain():
        block = qkv.view(B, keys, H + 2 * Hkv, Dh).transpose(1, 2)            # [B, H + 2 Hkv, keys, Dh]
        qh, kh, vh = block.split([H, Hkv, Hkv], dim=1)
        kh, vh = (t.repeat_interleave(H // Hkv, dim=1) for t in (kh, vh))
        F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2).reshape(B * keys, H * Dh)

    return {"plain": plain, "compiled": lambda: lib.packed_attention(q, k, v, cu, H, Hkv, bool(causal))}


def _rows_parallel_candidates(dtype: torch.dtype, shape: tuple[int, ...], rows: int, g) -> dict:
    """x [rows, in] W^T + b on oneDNN's packed weight: one call (plain) or a call per thread (compiled).
    A RuntimeError when the compiled kernels are not here."""
    from lmforge.kernels import compiled

    lib = compiled.library()
    if lib is None:
        raise RuntimeError(f"compiled kernels {compiled.status()}")
    k_in, outs = shape[0], shape[1:]
    w = torch.randn(sum(outs), k_in, generator=g) * 0.02
    packed, b = onednn.packed_weight((w,), (torch.zeros(sum(outs)),), dtype)
    x = torch.randn(rows, k_in, generator=g).to(dtype)
    return {"plain": lambda: onednn.gemm(x, packed, b),
            "compiled": lambda: onednn.gemm(x, packed, b, rows_parallel=torch.get_num_threads())}


def _rotate_store_candidates(dtype: torch.dtype, shape: tuple[int, ...], rows: int, g) -> dict:
    """Rotary positions on the Q and K heads of a [rows, (H + 2 Hkv) Dh] stream and (cache) its keys and
    values into a cache of 64 slots a row: plain (the rotation as models/layers.py computes it, two
    index copies) and compiled (csrc/rotate_store.cpp). A RuntimeError when nothing is compiled here."""
    from lmforge.kernels import compiled

    from lmforge.kernels import rotary

    H, Hkv, Dh, rope, cache = shape
    lib = compiled.library()
    if lib is None:
        raise RuntimeError(f"compiled kernels {compiled.status()}")
    qkv = torch.randn(rows, (H + 2 * Hkv) * Dh, generator=g).to(dtype)
    angles = torch.randn(rows, 1, Dh, generator=g) * 3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)    # rotations: repeated calls keep the scale
    k_rows, v_rows = (torch.zeros(rows * Hkv * 64, Dh, dtype=dtype) for _ in range(2))
    index = (torch.arange(rows * Hkv) * 64).reshape(-1)

    def plain():   # models/layers.py's path: the stream's rotation, then KVCache.write's index copies
        x = rotary.rotate_stream(qkv, (cos, sin), H, Hkv) if rope else qkv
        if cache:
            _, k, v = x.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
            k_rows.index_copy_(0, index, k.reshape(-1, Dh))
            v_rows.index_copy_(0, index, v.reshape(-1, Dh))

    def fused():
        lib.rotate_store(qkv, cos.view(rows, Dh) if rope else None, sin.view(rows, Dh) if rope else None, H, Hkv,
                         *((k_rows, v_rows, index) if cache else (None, None, None)))

    return {"plain": plain, "compiled": fused}


def _add_norm_candidates(dtype: torch.dtype, shape: tuple[int, ...], rows: int, g) -> dict:
    """norm(residual + y) over [rows, D] at inference, y in the compute dtype and the residual in fp32
    (a bf16 pass's mix): plain (the add, the norm, and the cast to the compute dtype the next GEMM
    makes) and compiled (csrc/add_norm.cpp). A RuntimeError when the compiled kernels are not here."""
    from lmforge.kernels import compiled

    D, rms = shape
    lib = compiled.library()
    if lib is None:
        raise RuntimeError(f"compiled kernels {compiled.status()}")
    y = torch.randn(rows, D, generator=g).to(dtype)
    residual = torch.randn(rows, D, generator=g)
    weight, bias = torch.randn(D, generator=g), None if rms else torch.randn(D, generator=g)

    def plain():
        s = residual + y
        if rms:
            n = weight * (s * s.pow(2).mean(-1, keepdim=True).add_(1e-6).rsqrt_())
        else:
            n = F.layer_norm(s, (D,), weight, bias, 1e-6)
        n.to(dtype)

    return {"plain": plain,
            "compiled": lambda: lib.add_norm(y, residual, weight, bias, 1e-6, bool(rms), False, dtype, rows)}


def measure(op: str, dtype: torch.dtype, train: bool, shape: tuple[int, ...], prefix: str,
            buckets: tuple[str, ...] = tuple(SIZES)) -> dict:
    """{prefix|bucket: {"kernel", "why"}} for these size buckets of one (op, shape), within BUDGET_S."""
    out, start = {}, clock()
    for b in buckets:
        rows = SIZES[b] if b in SIZES else int(b)
        if clock() - start > BUDGET_S:
            # not measured: plain for this process only, never written to the cache (a busy spell
            # must not fix a choice for good)
            out[f"{prefix}|{b}"] = {"kernel": "plain", "why": "calibration budget spent", "provisional": True}
            continue
        try:
            # inference_mode(False): a model's first call may come inside inference_mode, whose
            # tensors have no version counter (the packed-weight cache keys on it)
            with torch.inference_mode(False), torch.no_grad() if not train else torch.enable_grad():
                cands = _candidates(op, dtype, train, shape, rows)
                times = _time(cands, clock() + BUDGET_S / len(SIZES))
                kernel, close = _decide(times)
                again = close and clock() - start < BUDGET_S
                if again:   # too close to call: once more within the budget, each kernel's best kept
                    more = _time(cands, min(clock() + BUDGET_S / len(SIZES), start + BUDGET_S), warm_up=False)
                    times = {k: min(t, more[k]) for k, t in times.items()}
                    kernel, close = _decide(times)
        except RuntimeError as e:   # a kernel this build cannot run on this shape: plain it is
            # plain for this process only: a failure can come from the calling context (it did from
            # inference_mode), and a cached one would fix plain for good on this machine
            out[f"{prefix}|{b}"] = {"kernel": "plain", "why": f"a candidate failed: {str(e).splitlines()[0][:80]}",
                                    "provisional": True}
            continue
        why = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()) + \
            f" at {rows} {'keys' if op in ('attention', 'packed_attention') else 'rows'}"
        if again:
            why += ", measured twice" + (" (still close)" if close else "")
        out[f"{prefix}|{b}"] = {"kernel": kernel, "why": why}
    return out
