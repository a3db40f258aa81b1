"""Speed and memory of lmforge against transformers + peft, measured in the same run.

  python -m benchmarks.speed            # every measurement twice, the better kept (about 7 minutes)
  python -m benchmarks.speed --quick    # fewer timed batches, once each (under 5 minutes)

Both sides get the same model shape (all-MiniLM-L6-v2: 6 layers, 384 wide), the same batches (SST-2
dev sentences in a fixed shuffled order, 32 per batch, padded to the longest for transformers; and
fixed 32 x 128-token batches), the same thread count, and run one after the other, each
measurement in a fresh subprocess so its peak RSS is its own. lmforge runs packed (unpadded).
Results go to BENCHMARKS.md (ratios lmforge / baseline) and runs/bench/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import ROOT, write_section

SST2_DEV = "glue/SST-2/dev.tsv"


def data_root() -> Path:
    for p in [os.environ.get("LMFORGE_DATA"), ROOT.parent / "shared" / "data"]:
        if p and Path(p).is_dir():
            return Path(p)
    raise SystemExit("set LMFORGE_DATA to the data folder (needs glue/SST-2)")


def minilm_dir() -> Path:
    from lmforge.models.hub import resolve
    return resolve("minilm")


# -- workers: each runs in its own process --------------------------------------------------------
def sst2_batches(shape: str, n_batches: int, batch_size: int = 32):
    """Token-id batches as lists of lists (ids, labels): SST-2 dev lengths or fixed 128 tokens."""
    import torch
    from lmforge.data.tokenizer import load_tokenizer

    rows = [r.split("\t") for r in (data_root() / SST2_DEV).read_text().splitlines()[1:] if r]
    tok = load_tokenizer(minilm_dir())
    enc = tok([r[0] for r in rows], padding="none", max_length=128)["input_ids"]
    labels = [int(r[1]) for r in rows]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    out = []
    for b in range(n_batches):
        idx = [order[(b * batch_size + i) % len(order)] for i in range(batch_size)]
        if shape == "fixed128":
            ids = [(enc[i] * 8)[:128] for i in idx]
        else:
            ids = [enc[i] for i in idx]
        out.append((ids, [labels[i] for i in idx]))
    return out


def to_padded(ids, labels):
    import torch
    T = max(len(x) for x in ids)
    t = torch.zeros(len(ids), T, dtype=torch.long)
    m = torch.zeros(len(ids), T, dtype=torch.long)
    for i, x in enumerate(ids):
        t[i, :len(x)] = torch.tensor(x)
        m[i, :len(x)] = 1
    return t, m, torch.tensor(labels)


def build(side: str, method: str, head: str = "classification"):
    """(model, step(ids, labels) -> loss or logits) for lmforge or transformers(+peft)."""
    import torch.nn.functional as F

    if side == "lmforge":
        from lmforge.adapters.methods import MethodConfig, apply_method
        from lmforge.data.batches import Encoded, collate_packed, model_inputs
        from lmforge.models import from_pretrained

        model = from_pretrained(minilm_dir(), head=head, num_labels=2)
        if method in ("lora", "full"):
            apply_method(model, MethodConfig(method=method, lora_r=8, lora_alpha=16, lora_dropout=0.1))
        if method == "int8":
            from lmforge.infer.quantize import quantize_int8
            quantize_int8(model)

        def forward(ids, labels):
            b = collate_packed([Encoded(x, [0] * len(x), y) for x, y in zip(ids, labels)])
            return model(**model_inputs(b)).logits, b["labels"]
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2)
        if method == "lora":
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS",
                                                     target_modules=["query", "value"]))

        def forward(ids, labels):
            t, m, y = to_padded(ids, labels)
            return model(input_ids=t, attention_mask=m).logits, y

    def train_step(ids, labels):
        logits, y = forward(ids, labels)
        F.cross_entropy(logits, y).backward()

    return model, forward, train_step


def worker_train(side, method, shape, n):
    import torch
    model, _, step = build(side, method)
    model.train()
    zero_grad = None
    if side == "lmforge":  # each side's own optimizer and step, as its trainer runs them
        from lmforge.train.optim import build_optimizer
        from lmforge.train.sparse_rows import RowSparseGrads
        opt = build_optimizer(model, 1e-5)
        zero_grad = RowSparseGrads(model).zero_grad  # what lmforge's Trainer does (train/sparse_rows.py)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    zero_grad = zero_grad or (lambda o: o.zero_grad())
    batches = sst2_batches(shape, n + 2)
    for ids, y in batches[:2]:
        step(ids, y); opt.step(); zero_grad(opt)
    t = time.perf_counter()
    for ids, y in batches[2:]:
        step(ids, y); opt.step(); zero_grad(opt)
    dt = time.perf_counter() - t
    tokens = sum(len(x) for ids, _ in batches[2:] for x in ids)
    seq_sq = sum(len(x) ** 2 for ids, _ in batches[2:] for x in ids)
    return {"samples_per_s": 32 * n / dt, "tokens": tokens, "seq_sq": seq_sq, "seconds": dt}


def worker_infer(side, method, shape, n):
    import torch
    model, forward, _ = build(side, method)
    model.eval()
    batches = sst2_batches(shape, n + 2)
    # The best of 3 passes over the same batches: steady state, as in a server that has seen these
    # shapes (the first pass also builds each shape's kernels, and one pass lasts about a second).
    passes = []
    with torch.inference_mode():
        for ids, y in batches[:2]:
            forward(ids, y)
        for _ in range(3):
            t = time.perf_counter()
            for ids, y in batches[2:]:
                forward(ids, y)
            passes.append(time.perf_counter() - t)
    dt = min(passes)
    return {"seqs_per_s": 32 * n / dt, "seconds": dt, "first_pass_seqs_per_s": 32 * n / passes[0]}


def worker_latency(side, method, tokens, n):
    import torch
    ids = [[101] + [2000 + i for i in range(tokens - 2)] + [102]]
    if side == "onnxruntime":
        return onnx_latency(ids, n)
    model, forward, _ = build(side, method)
    model.eval()
    with torch.inference_mode():
        for _ in range(10):
            forward(ids, [0])
        times = []
        for _ in range(n):
            t = time.perf_counter()
            forward(ids, [0])
            times.append(time.perf_counter() - t)
    times.sort()
    return {"ms": 1000 * times[len(times) // 2]}


def onnx_latency(ids, n):
    import tempfile

    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2).eval()
    model.config.return_dict = False
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    t, m, _ = to_padded(ids, [0])
    torch.onnx.export(model, (t, m), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes={"input_ids": {0: "b", 1: "t"},
                                                             "attention_mask": {0: "b", 1: "t"}},
                      dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"input_ids": t.numpy().astype(np.int64), "attention_mask": m.numpy().astype(np.int64)}
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(n):
        s = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - s)
    times.sort()
    return {"ms": 1000 * times[len(times) // 2]}


def worker_mlm(side, _method, _shape, n):
    """MLM + NSP pre-training steps on a fresh MiniLM-shaped BERT, 15% of tokens masked."""
    import torch
    import torch.nn.functional as F

    batches = sst2_batches("sst2", n + 2)
    g = torch.Generator().manual_seed(0)
    if side == "lmforge":
        from lmforge.data.batches import Encoded, collate_packed, model_inputs
        from lmforge.models import Model, load_config
        model = Model(load_config(minilm_dir()).replace(head="pretraining"))
    else:
        from transformers import BertConfig, BertForPreTraining
        model = BertForPreTraining(BertConfig.from_pretrained(str(minilm_dir())))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(ids):
        nsp = torch.randint(0, 2, (len(ids),), generator=g)
        if side == "lmforge":
            b = collate_packed([Encoded(x, [0] * len(x)) for x in ids])
            flat = b["input_ids"]
            masked = (torch.rand(flat.shape, generator=g) < 0.15).nonzero().squeeze(-1)
            target = flat[masked].clone()
            b["input_ids"] = flat.index_fill(0, masked, 103)
            out = model(**model_inputs(b), positions=masked)
            loss = F.cross_entropy(out.logits, target) + F.cross_entropy(out.nsp_logits, nsp)
        else:
            t, m, _ = to_padded(ids, [0] * len(ids))
            masked = (torch.rand(t.shape, generator=g) < 0.15) & m.bool()
            labels = torch.where(masked, t, torch.full_like(t, -100))
            out = model(input_ids=t.masked_fill(masked, 103), attention_mask=m, labels=labels,
                        next_sentence_label=nsp)
            loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    for ids, _ in batches[:2]:
        step(ids)
    t = time.perf_counter()
    for ids, _ in batches[2:]:
        step(ids)
    dt = time.perf_counter() - t
    return {"tokens_per_s": sum(len(x) for ids, _ in batches[2:] for x in ids) / dt}


def worker_gemm(*_):
    """fp32 GEMM throughput two ways: torch.mm (the 'measured peak' baselines are usually quoted
    against) and oneDNN with a prepacked weight (what lmforge's Linear uses), at 2048^3."""
    import torch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)

    def rate(f):
        for _ in range(3):
            f()
        t = time.perf_counter()
        for _ in range(10):
            f()
        return 2 * 2048 ** 3 * 10 / (time.perf_counter() - t) / 1e9

    out = {"gflops": rate(lambda: a @ b)}
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous())
        out["gflops_onednn"] = rate(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    except (AttributeError, RuntimeError):
        pass
    # int8: torch's dynamic quantized linear with the weights prepacked as `quantize_int8` does
    # (oneDNN where available), activation quantization included, 2 ops per multiply-add like fp32
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from lmforge.infer.quantize import prepack_engine
    with prepack_engine() as engine:
        q = DynamicLinear(2048, 2048, bias_=False)
        q.set_weight_bias(torch.quantize_per_channel(b.t().contiguous(), torch.full((2048,), 0.02),
                                                     torch.zeros(2048, dtype=torch.long), 0, torch.qint8), None)
    out["int8_engine"] = engine
    out["gops_int8"] = rate(lambda: q(a))
    return out


WORKERS = {"train": worker_train, "infer": worker_infer, "latency": worker_latency, "mlm": worker_mlm,
           "gemm": worker_gemm}


ROUNDS = 2


def _better(a: dict, b: dict) -> dict:
    """The better of two runs of one measurement (an error loses)."""
    if "error" in a or "error" in b:
        return b if "error" in a else a
    for key, higher in (("samples_per_s", True), ("seqs_per_s", True), ("tokens_per_s", True), ("ms", False),
                        ("gflops", True)):
        if key in a:
            return a if (a[key] >= b[key]) == higher else b
    return a


def run_worker(kind, side, method, shape, n) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.speed", "--worker", json.dumps([kind, side, method, shape, n])]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- the report -------------------------------------------------------------------------------
def forward_flops(tokens: int, seq_sq: int, d=384, inter=1536, layers=6) -> float:
    """Multiply-adds x 2 of the encoder on `tokens` real tokens (sum of squared lengths for attention)."""
    return layers * (2 * tokens * (4 * d * d + 2 * d * inter) + 2 * 2 * seq_sq * d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, side, method, shape, n = json.loads(args.worker)
        result = WORKERS[kind](side, method, shape, n)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return 0

    n_train, n_infer, n_lat = (6, 10, 30) if args.quick else (20, 27, 100)
    plan = [
        ("gemm", "gemm", "", "", 0),
        ("lora_train_sst2", "train", "lora", "sst2", n_train),
        ("full_train_sst2", "train", "full", "sst2", n_train),
        ("lora_train_128", "train", "lora", "fixed128", max(2, n_train // 2)),
        ("infer_sst2", "infer", "none", "sst2", n_infer),
        ("infer_128", "infer", "none", "fixed128", max(3, n_infer // 2)),
        ("latency_16", "latency", "none", 16, n_lat),
        ("latency_64", "latency", "none", 64, n_lat),
        ("mlm_pretrain", "mlm", "", "", n_train),
    ]
    plan += [("int8_infer_sst2", "infer", "int8", "sst2", n_infer), ("int8_latency_64", "latency", "int8", 64, n_lat)]
    # Each measurement ROUNDS times, the sides alternating, and the better run of each side kept: a
    # slow spell of this shared machine then has to hit every round of a side to move its figure.
    rounds = 1 if args.quick else ROUNDS
    results: dict = {}
    for name, kind, method, shape, n in plan:
        sides = ["lmforge"] if kind == "gemm" or method == "int8" else ["lmforge", "transformers"]
        if kind == "latency" and method != "int8":
            sides.append("onnxruntime")
        for _ in range(rounds):
            for side in sides:
                r = run_worker(kind, side, method, shape, n)
                key = f"{name}/{side}"
                results[key] = _better(results[key], r) if key in results else r
                print(name, side, r, flush=True)

    body = render(results, results["gemm/lmforge"]["gflops"], results["gemm/lmforge"].get("gflops_onednn"))
    body += f"\nEach figure is the better of {rounds} run(s) of its measurement, the sides alternating.\n"
    out = ROOT / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=1))
    command = "python -m benchmarks.speed" + (" --quick" if args.quick else "")
    write_section("Speed" + (" (quick)" if args.quick else ""), command, body)
    print(body)
    return 0


def _get(results, key, field):
    return results.get(key, {}).get(field)


def render(results: dict, peak: float, peak_onednn: float | None = None) -> str:
    rows = []

    def row(label, key, field, unit, higher=True, baseline="transformers", target=None):
        ours, base = _get(results, f"{key}/lmforge", field), _get(results, f"{key}/{baseline}", field)
        if ours is None or base is None:
            err = results.get(f"{key}/lmforge", {}).get("error") or results.get(f"{key}/{baseline}", {}).get("error")
            rows.append(f"| {label} | {ours or '-'} | {base or '-'} | - | {target or ''} (not measured: {err}) |")
            return
        ratio = ours / base if higher else base / ours
        rows.append(f"| {label} | {ours:.1f} {unit} | {base:.1f} {unit} | **{ratio:.2f}x** | {target or ''} |")

    row("LoRA fine-tuning, SST-2 lengths (r=8, q,v)", "lora_train_sst2", "samples_per_s", "samples/s", target="3x")
    row("Full fine-tuning, SST-2 lengths", "full_train_sst2", "samples_per_s", "samples/s", target="2.5x")
    row("LoRA fine-tuning, 32 x 128 tokens", "lora_train_128", "samples_per_s", "samples/s")
    row("Inference, SST-2 lengths", "infer_sst2", "seqs_per_s", "seq/s", target="2.5x")
    row("Inference, 32 x 128 tokens", "infer_128", "seqs_per_s", "seq/s")
    row("Batch-1 latency, 16 tokens", "latency_16", "ms", "ms", higher=False)
    row("Batch-1 latency, 64 tokens", "latency_64", "ms", "ms", higher=False)
    row("Batch-1 latency, 16 tokens, vs ONNX Runtime fp32", "latency_16", "ms", "ms", higher=False,
        baseline="onnxruntime")
    row("Batch-1 latency, 64 tokens, vs ONNX Runtime fp32", "latency_64", "ms", "ms", higher=False,
        baseline="onnxruntime", target="1x")
    row("MLM+NSP pre-training (vs BertForPreTraining)", "mlm_pretrain", "tokens_per_s", "tokens/s", target="2x")
    for key in ("lora_train_sst2", "full_train_sst2"):
        ours, base = _get(results, f"{key}/lmforge", "peak_rss_mb"), _get(results, f"{key}/transformers", "peak_rss_mb")
        if ours and base:
            rows.append(f"| Peak RSS, {key.replace('_', ' ')} | {ours:.0f} MB | {base:.0f} MB | "
                        f"**{base / ours:.2f}x** less | lower |")
    int8, fp32 = _get(results, "int8_infer_sst2/lmforge", "seqs_per_s"), _get(results, "infer_sst2/lmforge", "seqs_per_s")
    if int8 and fp32:
        rows.append(f"| int8 inference, SST-2 lengths (vs our fp32) | {int8:.1f} seq/s | {fp32:.1f} seq/s | "
                    f"**{int8 / fp32:.2f}x** | 1.5x |")
    i8l, f32l = _get(results, "int8_latency_64/lmforge", "ms"), _get(results, "latency_64/lmforge", "ms")
    if i8l and f32l:
        rows.append(f"| int8 batch-1 latency, 64 tokens (vs our fp32) | {i8l:.1f} ms | {f32l:.1f} ms | "
                    f"**{f32l / i8l:.2f}x** | |")
    util = []
    for key, factor in (("lora_train_sst2", 2), ("full_train_sst2", 3)):
        for side in ("lmforge", "transformers"):
            r = results.get(f"{key}/{side}", {})
            if "samples_per_s" in r:
                # useful work: real tokens only (padding is not useful); LoRA needs forward + input
                # gradients (2x forward), full fine-tuning also weight gradients (3x)
                flops = factor * forward_flops(r["tokens"], r["seq_sq"]) / r["seconds"] / 1e9
                line = (f"- {key.replace('_', ' ')}, {side}: {flops:.0f} GFLOP/s useful = "
                        f"{100 * flops / peak:.0f}% of the torch.mm fp32 GEMM peak ({peak:.0f} GFLOP/s)")
                if peak_onednn:
                    line += f", {100 * flops / peak_onednn:.0f}% of oneDNN's ({peak_onednn:.0f} GFLOP/s)"
                util.append(line)
    gemm = results.get("gemm/lmforge", {})
    if gemm.get("gops_int8") and peak_onednn:
        util.append(f"- GEMM at 2048^3: int8 ({gemm.get('int8_engine', 'fbgemm')} dynamic, what `--quantize int8` runs) "
                    f"{gemm['gops_int8']:.0f} GOP/s "
                    f"against fp32 {peak_onednn:.0f} GFLOP/s with oneDNN's prepacked weights (lmforge's fp32 path) "
                    f"and {peak:.0f} with torch.mm: int8 arithmetic alone is {gemm['gops_int8'] / peak_onednn:.2f}x "
                    f"lmforge's fp32 here")
    head = ("| measurement | lmforge | baseline | ratio | target |\n|---|---|---|---|---|\n")
    return (head + "\n".join(rows) + "\n\nBaseline: transformers + peft (padded to the longest in each batch), "
            "unless the row names ONNX Runtime. lmforge runs packed (unpadded).\n\n" + "\n".join(util) + "\n")


if __name__ == "__main__":
    sys.exit(main())
