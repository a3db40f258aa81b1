"""Speed and memory of lmforge against transformers + peft, measured in the same run, on the machine
as it is and with its newer instructions hidden from the math libraries.

  python -m benchmarks.speed            # 3 ISA settings, every measurement twice (about 30-40 minutes)
  python -m benchmarks.speed --quick    # native only, fewer timed batches, once each (about 6 minutes)
  python -m benchmarks.speed --quick --isa native,avx2 --only lora_train_sst2,infer_sst2
                                        # a subset (prints the tables; BENCHMARKS.md is left alone)

Both sides get the same model shape (all-MiniLM-L6-v2: 6 layers, 384 wide), the same batches (SST-2
dev sentences in a fixed shuffled order, 32 per batch, padded to the longest for transformers; and
fixed 32 x 128-token batches), the same thread count, and run one after the other, each
measurement in a fresh subprocess so its peak RSS is its own. lmforge runs packed (unpadded).

Precision: the fp32 rows run lmforge with `--precision fp32` against transformers + peft in fp32
(and ONNX Runtime fp32 for batch-1 latency). The bf16 rows run lmforge with `--precision auto`
(forward and backward under `resolve_precision("auto", cpu).autocast(cpu)`) against lmforge fp32
from the same run and against transformers + peft with `torch.autocast("cpu", dtype=torch.bfloat16)`
around forward and backward; they run only where `auto` resolves to bf16 (AMX or AVX512_BF16).

ISA settings (`--isa`, default all three, or `native` alone on a CPU without AVX-512, where the caps
hide nothing; `native` only with --quick), set in each worker's environment:
  native        the machine as it is (ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS removed)
  avx512-vnni   ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI: AVX-512 and VNNI, no AMX, no AVX512_BF16
  avx2          ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2: as
                on most laptops (oneDNN, MKL and torch's own vectorized kernels all capped)
ONNX Runtime's MLAS kernels read none of these variables, so its rows are uncapped in every setting.
Each setting's table is labelled with what lmforge.kernels.machine.info() reports inside its workers
(the flags left after the cap) and what `--precision auto` resolves to there. Each setting keeps its
own kernel-choice cache (runs/bench/kernel-cache/SETTING), so the settings never overwrite each
other's calibration (nor the user's ~/.cache/lmforge); every lmforge worker records the kernel
choices it used (op, compute dtype, mode, weight shape, row bucket -> onednn | plain).

Results go to BENCHMARKS.md (ratios lmforge / baseline, with the target and met / missed) and
runs/bench/speed.json (every worker's figures, machine, precision and kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import ROOT, flags_text, kernel_summary, write_section

SST2_DEV = "glue/SST-2/dev.tsv"

# --isa values -> the environment of every worker in that setting (None: removed from it).
ISA_ENVS = {
    "native": {"ONEDNN_MAX_CPU_ISA": None, "MKL_ENABLE_INSTRUCTIONS": None, "ATEN_CPU_CAPABILITY": None},
    "avx512-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "MKL_ENABLE_INSTRUCTIONS": None,
                    "ATEN_CPU_CAPABILITY": None},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
ISA_TITLES = {"native": "as the machine is", "avx512-vnni": "without AMX and AVX512_BF16",
              "avx2": "AVX2 only, as on most laptops"}


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


# What the worker ran at and with, for its JSON (set by precision_context / record_kernels).
WORKER_FACTS: dict = {}


def precision_context(side: str, precision: str):
    """A factory of the context each forward + backward runs under. lmforge: `precision` is its
    --precision (fp32 | auto | bf16), resolved as the library resolves it; transformers: fp32, or
    bf16 as a transformers user would run it (torch.autocast around forward and backward)."""
    import torch
    cpu = torch.device("cpu")
    if side == "lmforge":
        from lmforge.kernels import resolve_precision
        p = resolve_precision(precision, cpu)
        WORKER_FACTS["precision"] = {"asked": precision, "name": p.name, "why": p.why}
        return lambda: p.autocast(cpu)
    if precision == "bf16":
        WORKER_FACTS["precision"] = {"asked": "bf16", "name": "bf16",
                                     "why": 'torch.autocast("cpu", dtype=torch.bfloat16)'}
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    WORKER_FACTS["precision"] = {"asked": "fp32", "name": "fp32", "why": "default"}
    return contextlib.nullcontext


def record_kernels() -> None:
    """Record every kernel choice lmforge makes in this worker ({op|dtype|mode|shape|bucket: kernel})."""
    from lmforge.kernels import calibrate
    used: dict = {}
    WORKER_FACTS["kernels_used"] = used
    original = calibrate.CHOICES.choose

    def choose(op, device, dtype, train, shape, rows):
        kernel = original(op, device, dtype, train, shape, rows)
        key = (f"{op}|{str(dtype).removeprefix('torch.')}|{'train' if train else 'infer'}|"
               f"{'x'.join(map(str, shape))}|{calibrate.bucket(rows)}")
        used[key] = kernel
        return kernel

    calibrate.CHOICES.choose = choose   # the module-level choose() the kernels call goes through it


def kernel_facts() -> dict:
    """The choices this worker used, each with the calibration's reason, and their summary."""
    used = WORKER_FACTS.get("kernels_used")
    if used is None:
        return {}
    from lmforge.kernels.calibrate import CHOICES, forced
    table = CHOICES.table()
    detail = {k: {"kernel": v, "why": table.get(k, {}).get("why", "forced" if forced() else "")}
              for k, v in sorted(used.items())}
    return {"kernels": detail, "kernel_summary": kernel_summary(used), "kernels_forced": forced() or None}


def build(side: str, method: str, head: str = "classification"):
    """(model, forward(ids, labels) -> (logits, labels), train_step) for lmforge or transformers(+peft)."""
    import torch.nn.functional as F

    if side == "lmforge":
        from lmforge.adapters.methods import MethodConfig, apply_method
        from lmforge.data.batches import Encoded, collate_packed, model_inputs
        from lmforge.models import from_pretrained

        from lmforge.models import routing

        record_kernels()
        model = from_pretrained(minilm_dir(), head=head, num_labels=2)
        adapter = None
        if method in ("lora", "full"):
            spec = apply_method(model, MethodConfig(method=method, lora_r=8, lora_alpha=16, lora_dropout=0.1))
            adapter = getattr(spec, "adapter", None)   # what finetune routes every forward to
        if method == "int8":
            from lmforge.infer.quantize import quantize_int8
            quantize_int8(model)

        def forward(ids, labels):
            b = collate_packed([Encoded(x, [0] * len(x), y) for x, y in zip(ids, labels)])
            with routing.using(adapter) if adapter else contextlib.nullcontext():
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
        F.cross_entropy(logits.float(), y).backward()

    return model, forward, train_step


def worker_train(side, method, shape, n, precision="fp32"):
    import torch
    model, _, train_step = build(side, method)
    model.train()
    amp = precision_context(side, precision)

    def step(ids, y):   # forward and backward under the precision's context; the optimizer outside it
        with amp():
            train_step(ids, y)

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


def worker_infer(side, method, shape, n, precision="fp32"):
    import torch
    model, forward, _ = build(side, method)
    model.eval()
    amp = precision_context(side, precision)
    batches = sst2_batches(shape, n + 2)
    # The best of 3 passes over the same batches: steady state, as in a server that has seen these
    # shapes (the first pass also builds each shape's kernels, and one pass lasts about a second).
    passes = []
    with torch.inference_mode(), amp():
        for ids, y in batches[:2]:
            forward(ids, y)
        for _ in range(3):
            t = time.perf_counter()
            for ids, y in batches[2:]:
                forward(ids, y)
            passes.append(time.perf_counter() - t)
    dt = min(passes)
    return {"seqs_per_s": 32 * n / dt, "seconds": dt, "first_pass_seqs_per_s": 32 * n / passes[0]}


def worker_latency(side, method, tokens, n, precision="fp32"):
    import torch
    ids = [[101] + [2000 + i for i in range(tokens - 2)] + [102]]
    if side == "onnxruntime":
        return onnx_latency(ids, n)
    model, forward, _ = build(side, method)
    model.eval()
    amp = precision_context(side, precision)
    with torch.inference_mode(), amp():
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
    return {"ms": 1000 * times[len(times) // 2], "onnxruntime": ort.__version__}


def worker_mlm(side, _method, _shape, n, _precision="fp32"):
    """MLM + NSP pre-training steps on a fresh MiniLM-shaped BERT, 15% of tokens masked."""
    import torch
    import torch.nn.functional as F

    batches = sst2_batches("sst2", n + 2)
    g = torch.Generator().manual_seed(0)
    if side == "lmforge":
        from lmforge.data.batches import Encoded, collate_packed, model_inputs
        from lmforge.models import Model, load_config
        record_kernels()
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
    """GEMM throughput at 2048^3: fp32 two ways, torch.mm (the 'measured peak' baselines are usually
    quoted against) and oneDNN with a prepacked weight (what lmforge's Linear uses); bf16 through
    oneDNN prepacked where this setting has bf16 instructions; int8 as `--quantize int8` runs it."""
    import torch

    from lmforge.kernels import machine
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
        if machine.has_bf16():
            a16 = a.bfloat16()
            packed16 = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous().bfloat16())
            out["gflops_onednn_bf16"] = rate(
                lambda: torch.ops.mkldnn._linear_pointwise(a16, packed16, None, "none", [], ""))
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


def worker_probe(*_):
    """What this ISA setting looks like from inside a worker: machine.info() after the cap, what
    `--precision auto` resolves to, torch's own CPU capability."""
    import torch

    from lmforge.kernels import machine, resolve_precision
    p = resolve_precision("auto", torch.device("cpu"))
    return {"machine": machine.info(), "auto": {"name": p.name, "why": p.why},
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}


WORKERS = {"train": worker_train, "infer": worker_infer, "latency": worker_latency, "mlm": worker_mlm,
           "gemm": worker_gemm, "probe": worker_probe}


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


def worker_env(isa: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           # each setting its own kernel-choice cache: the cache holds one machine key (which the cap
           # is part of), so settings sharing one file would recalibrate on every switch
           "LMFORGE_CACHE_DIR": str(ROOT / "runs" / "bench" / "kernel-cache" / isa)}
    for k, v in ISA_ENVS[isa].items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_worker(kind, side, method, shape, n, precision="fp32", isa="native") -> dict:
    spec = json.dumps([kind, side, method, shape, n, precision])
    cmd = [sys.executable, "-m", "benchmarks.speed", "--worker", spec]
    p = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(isa))
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_in_worker(spec: str) -> dict:
    kind, side, method, shape, n, *rest = json.loads(spec)
    result = WORKERS[kind](side, method, shape, n, *rest)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if kind != "probe":
        from lmforge.kernels import machine
        info = machine.info()
        result["machine"] = {"flags": info["flags"], "isa_cap": info["isa_cap"]}
        result.update({k: v for k, v in WORKER_FACTS.items() if k != "kernels_used"})
        result.update(kernel_facts())
    return result


# -- the plan ---------------------------------------------------------------------------------
FP32 = [("lmforge", "fp32"), ("transformers", "fp32")]
BF16 = [("lmforge", "auto"), ("transformers", "bf16")]


def make_plan(quick: bool) -> list[tuple]:
    """(name, kind, method, shape, n, sides [(side, precision)], bf16 row)."""
    n_train, n_infer, n_lat = (6, 10, 30) if quick else (20, 27, 100)
    lat = FP32 + [("onnxruntime", "fp32")]
    return [
        ("gemm", "gemm", "", "", 0, [("lmforge", "fp32")], False),
        ("lora_train_sst2", "train", "lora", "sst2", n_train, FP32, False),
        ("lora_train_sst2_bf16", "train", "lora", "sst2", n_train, BF16, True),
        ("full_train_sst2", "train", "full", "sst2", n_train, FP32, False),
        ("lora_train_128", "train", "lora", "fixed128", max(2, n_train // 2), FP32, False),
        ("infer_sst2", "infer", "none", "sst2", n_infer, FP32, False),
        ("infer_sst2_bf16", "infer", "none", "sst2", n_infer, BF16, True),
        ("infer_128", "infer", "none", "fixed128", max(3, n_infer // 2), FP32, False),
        ("latency_16", "latency", "none", 16, n_lat, lat, False),
        ("latency_64", "latency", "none", 64, n_lat, lat, False),
        ("latency_64_bf16", "latency", "none", 64, n_lat, BF16, True),
        ("mlm_pretrain", "mlm", "", "", n_train, FP32, False),
        ("int8_infer_sst2", "infer", "int8", "sst2", n_infer, [("lmforge", "fp32")], False),
        ("int8_latency_64", "latency", "int8", 64, n_lat, [("lmforge", "fp32")], False),
    ]


def measure_setting(isa: str, plan, rounds: int) -> dict:
    """Every row of the plan in one ISA setting: {"probe": ..., "results": {name/side: worker JSON}}."""
    probe = run_worker("probe", "lmforge", "", "", 0, isa=isa)
    print(isa, "probe", probe, flush=True)
    bf16_here = probe.get("auto", {}).get("name") == "bf16"
    results: dict = {}
    skipped = []
    for name, kind, method, shape, n, sides, bf16_row in plan:
        if bf16_row and not bf16_here:
            skipped.append(name)   # `auto` is fp32 here: the fp32 rows already measure it
            continue
        # Each measurement `rounds` times, the sides alternating, and the better run of each side
        # kept: a slow spell of this shared machine then has to hit every round of a side to move it.
        for _ in range(rounds):
            for side, precision in sides:
                r = run_worker(kind, side, method, shape, n, precision, isa)
                key = f"{name}/{side}"
                results[key] = _better(results[key], r) if key in results else r
                print(isa, name, side, precision, {k: v for k, v in r.items() if k != "kernels"}, flush=True)
    return {"probe": probe, "results": results, "skipped": skipped}


# -- the report -------------------------------------------------------------------------------
def forward_flops(tokens: int, seq_sq: int, d=384, inter=1536, layers=6) -> float:
    """Multiply-adds x 2 of the encoder on `tokens` real tokens (sum of squared lengths for attention)."""
    return layers * (2 * tokens * (4 * d * d + 2 * d * inter) + 2 * 2 * seq_sq * d)


AUTO = "`--precision auto`"
HF_BF16 = "transformers + peft, autocast bf16"
# (label, ours, baseline, field, unit, higher is better, target: ratio | "lower" | None)
FP32_ROWS = [
    ("LoRA fine-tuning, SST-2 lengths (r=8, q,v)", "lora_train_sst2/lmforge", "lora_train_sst2/transformers",
     "samples_per_s", "samples/s", True, 3.0),
    ("Full fine-tuning, SST-2 lengths", "full_train_sst2/lmforge", "full_train_sst2/transformers",
     "samples_per_s", "samples/s", True, 2.5),
    ("LoRA fine-tuning, 32 x 128 tokens", "lora_train_128/lmforge", "lora_train_128/transformers",
     "samples_per_s", "samples/s", True, None),
    ("Inference, SST-2 lengths", "infer_sst2/lmforge", "infer_sst2/transformers", "seqs_per_s", "seq/s", True, 2.5),
    ("Inference, 32 x 128 tokens", "infer_128/lmforge", "infer_128/transformers", "seqs_per_s", "seq/s", True, None),
    ("Batch-1 latency, 16 tokens", "latency_16/lmforge", "latency_16/transformers", "ms", "ms", False, None),
    ("Batch-1 latency, 64 tokens", "latency_64/lmforge", "latency_64/transformers", "ms", "ms", False, None),
    ("Batch-1 latency, 16 tokens, vs ONNX Runtime fp32", "latency_16/lmforge", "latency_16/onnxruntime",
     "ms", "ms", False, None),
    ("Batch-1 latency, 64 tokens, vs ONNX Runtime fp32", "latency_64/lmforge", "latency_64/onnxruntime",
     "ms", "ms", False, 1.0),
    ("MLM+NSP pre-training (vs BertForPreTraining)", "mlm_pretrain/lmforge", "mlm_pretrain/transformers",
     "tokens_per_s", "tokens/s", True, 2.0),
    ("Peak RSS, LoRA fine-tuning SST-2", "lora_train_sst2/lmforge", "lora_train_sst2/transformers",
     "peak_rss_mb", "MB", False, "lower"),
    ("Peak RSS, full fine-tuning SST-2", "full_train_sst2/lmforge", "full_train_sst2/transformers",
     "peak_rss_mb", "MB", False, "lower"),
    ("int8 inference, SST-2 lengths (vs our fp32)", "int8_infer_sst2/lmforge", "infer_sst2/lmforge",
     "seqs_per_s", "seq/s", True, 1.5),
    ("int8 batch-1 latency, 64 tokens (vs our fp32)", "int8_latency_64/lmforge", "latency_64/lmforge",
     "ms", "ms", False, None),
]
BF16_ROWS = [
    (f"LoRA fine-tuning, SST-2 lengths, {AUTO} vs our fp32", "lora_train_sst2_bf16/lmforge",
     "lora_train_sst2/lmforge", "samples_per_s", "samples/s", True, 2.5),
    (f"LoRA fine-tuning, SST-2 lengths, {AUTO} vs {HF_BF16}", "lora_train_sst2_bf16/lmforge",
     "lora_train_sst2_bf16/transformers", "samples_per_s", "samples/s", True, 3.0),
    (f"Inference, SST-2 lengths, {AUTO} vs our fp32", "infer_sst2_bf16/lmforge", "infer_sst2/lmforge",
     "seqs_per_s", "seq/s", True, 2.5),
    (f"Inference, SST-2 lengths, {AUTO} vs {HF_BF16}", "infer_sst2_bf16/lmforge", "infer_sst2_bf16/transformers",
     "seqs_per_s", "seq/s", True, 2.5),
    (f"Batch-1 latency, 64 tokens, {AUTO} vs our fp32", "latency_64_bf16/lmforge", "latency_64/lmforge",
     "ms", "ms", False, None),
    (f"Batch-1 latency, 64 tokens, {AUTO} vs {HF_BF16}", "latency_64_bf16/lmforge", "latency_64_bf16/transformers",
     "ms", "ms", False, None),
    ("transformers + peft: autocast bf16 vs fp32, LoRA fine-tuning", "lora_train_sst2_bf16/transformers",
     "lora_train_sst2/transformers", "samples_per_s", "samples/s", True, None),
    ("transformers + peft: autocast bf16 vs fp32, inference", "infer_sst2_bf16/transformers",
     "infer_sst2/transformers", "seqs_per_s", "seq/s", True, None),
]


def _get(results, key, field):
    return results.get(key, {}).get(field)


def ratio_of(results: dict, spec) -> tuple[float | None, str]:
    """(ratio, 'met' | 'missed' | '') of one row spec; ratio > 1 is lmforge ahead."""
    _label, ours_key, base_key, field, _unit, higher, target = spec
    ours, base = _get(results, ours_key, field), _get(results, base_key, field)
    if not ours or not base:
        return None, ""
    ratio = ours / base if higher else base / ours
    if target is None:
        return ratio, ""
    need = 1.0 if target == "lower" else target
    return ratio, "met" if (ratio > need if target == "lower" else ratio >= need) else "**missed**"


def target_text(target, uncapped: bool = False) -> str:
    if target is None:
        return ""
    if uncapped:
        return "(no target: ONNX Runtime is not capped)"
    return "lower" if target == "lower" else f"≥ {target:g}x"


def table(results: dict, specs, isa: str) -> list[str]:
    lines = ["| measurement | lmforge | baseline | ratio | target | |", "|---|---:|---:|---:|---|---|"]
    for spec in specs:
        label, ours_key, base_key, field, unit, higher, target = spec
        uncapped = isa != "native" and base_key.endswith("/onnxruntime")
        ours, base = _get(results, ours_key, field), _get(results, base_key, field)
        if not ours or not base:
            err = results.get(ours_key, {}).get("error") or results.get(base_key, {}).get("error")
            if err or ours_key in results or base_key in results:
                fmt = "{:.0f}" if unit == "MB" else "{:.1f}"
                o, b = (fmt.format(v) + f" {unit}" if v else "-" for v in (ours, base))
                lines.append(f"| {label} | {o} | {b} | - | {target_text(target, uncapped)} | "
                             f"not measured{': ' + err if err else ''} |")
            continue
        ratio, mark = ratio_of(results, spec)
        if uncapped:
            mark = ""
        fmt = "{:.0f}" if unit == "MB" else "{:.1f}"
        lines.append(f"| {label} | {fmt.format(ours)} {unit} | {fmt.format(base)} {unit} | "
                     f"**{ratio:.2f}x**{' less' if target == 'lower' else ''} | "
                     f"{target_text(target, uncapped)} | {mark} |")
    return lines


def merged_kernels(results: dict) -> dict:
    used: dict = {}
    for key, r in results.items():
        if key.endswith("/lmforge"):
            used.update(r.get("kernels") or {})
    return used


def render_setting(isa: str, setting: dict) -> str:
    probe, results = setting["probe"], setting["results"]
    info = probe.get("machine", {})
    auto = probe.get("auto", {})
    env = ", ".join(f"{k}={v}" for k, v in ISA_ENVS[isa].items() if v) or "no ISA variables set"
    out = [f"### `--isa {isa}`: {ISA_TITLES[isa]}", ""]
    if "error" in probe:
        return "\n".join(out + [f"Not measured: the probe worker failed ({probe['error']}).", ""])
    out.append(f"Workers ran with {env}. Inside them, `lmforge.kernels.machine.info()` reports "
               f"{flags_text(info.get('flags'))}; torch's own kernels: {probe.get('aten_cpu_capability')}; "
               f"`--precision auto` resolves to **{auto.get('name')}** ({auto.get('why')}).")
    out += ["", "fp32: lmforge `--precision fp32` against transformers + peft fp32 (padded to the longest in "
            "each batch), unless the row names ONNX Runtime; lmforge runs packed (unpadded).", ""]
    out += table(results, FP32_ROWS, isa)
    if any(k.split("/")[0].endswith("_bf16") for k in results):
        lm = ", ".join(sorted({r["precision"]["name"] for k, r in results.items()
                               if k.split("/")[0].endswith("_bf16") and k.endswith("/lmforge")
                               and "precision" in r})) or "?"
        out += ["", f"bf16: lmforge {AUTO} (resolved in its workers to {lm}; forward and backward under "
                f"`resolve_precision(\"auto\", cpu).autocast(cpu)`, fp32 master weights) against lmforge fp32 "
                f"above and against transformers + peft with `torch.autocast(\"cpu\", dtype=torch.bfloat16)` "
                f"around forward and backward.", ""]
        out += table(results, BF16_ROWS, isa)
    elif setting.get("skipped"):
        out += ["", f"bf16 rows not run: {AUTO} resolves to fp32 here, which the fp32 rows measure."]
    out.append("")
    gemm = results.get("gemm/lmforge", {})
    peak, peak_onednn = gemm.get("gflops"), gemm.get("gflops_onednn")
    for key, factor in (("lora_train_sst2", 2), ("full_train_sst2", 3)):
        for side in ("lmforge", "transformers"):
            r = results.get(f"{key}/{side}", {})
            if "samples_per_s" in r and peak:
                # useful work: real tokens only (padding is not useful); LoRA needs forward + input
                # gradients (2x forward), full fine-tuning also weight gradients (3x)
                flops = factor * forward_flops(r["tokens"], r["seq_sq"]) / r["seconds"] / 1e9
                line = (f"- {key.replace('_', ' ')}, {side}: {flops:.0f} GFLOP/s useful = "
                        f"{100 * flops / peak:.0f}% of the torch.mm fp32 GEMM peak ({peak:.0f} GFLOP/s)")
                if peak_onednn:
                    line += f", {100 * flops / peak_onednn:.0f}% of oneDNN's ({peak_onednn:.0f} GFLOP/s)"
                out.append(line)
    if gemm.get("gops_int8") and peak_onednn:
        out.append(f"- GEMM at 2048^3: int8 ({gemm.get('int8_engine', 'fbgemm')} dynamic, what `--quantize int8` "
                   f"runs) {gemm['gops_int8']:.0f} GOP/s against fp32 {peak_onednn:.0f} GFLOP/s with oneDNN's "
                   f"prepacked weights (lmforge's fp32 path) and {peak:.0f} with torch.mm: int8 arithmetic alone "
                   f"is {gemm['gops_int8'] / peak_onednn:.2f}x lmforge's fp32 here")
    if gemm.get("gflops_onednn_bf16") and peak_onednn:
        out.append(f"- GEMM at 2048^3, bf16 through oneDNN with prepacked weights: "
                   f"{gemm['gflops_onednn_bf16']:.0f} GFLOP/s, {gemm['gflops_onednn_bf16'] / peak_onednn:.2f}x "
                   f"its fp32")
    used = merged_kernels(results)
    forced = next((r.get("kernels_forced") for k, r in results.items() if r.get("kernels_forced")), None)
    out.append(f"- kernels the lmforge workers used (weight shape x row bucket choices; calibrated in this "
               f"setting): {'forced ' + json.dumps(forced) if forced else kernel_summary(used)}")
    return "\n".join(out) + "\n"


def render_summary(settings: dict) -> str:
    """One row per targeted measurement, one column per ISA setting."""
    isas = list(settings)
    lines = ["| measurement | target | " + " | ".join(f"`{i}`" for i in isas) + " |",
             "|---|---|" + "---|" * len(isas)]
    for spec in FP32_ROWS + BF16_ROWS:
        if spec[6] is None:
            continue
        cells = []
        for isa in isas:
            ratio, mark = ratio_of(settings[isa]["results"], spec)
            if isa != "native" and spec[2].endswith("/onnxruntime"):
                mark = "ORT uncapped"
            res = settings[isa]["results"]
            skipped = spec[1].split("/")[0] in settings[isa].get("skipped", ())
            cells.append(f"{ratio:.2f}x {mark}".strip() if ratio is not None else
                         "not run: `auto` is fp32 here" if skipped else
                         "not measured" if spec[1] in res or spec[2] in res else "-")
        if all(c == "-" for c in cells):
            continue
        lines.append(f"| {spec[0]} | {target_text(spec[6])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(settings: dict, rounds: int) -> str:
    parts = []
    if len(settings) > 1:
        parts.append("Targets in every ISA setting (ratio, then met / missed; details below):\n\n"
                     + render_summary(settings))
    parts += [render_setting(isa, s) for isa, s in settings.items()]
    parts.append(f"Each figure is the better of {rounds} run(s) of its measurement, the sides alternating; "
                 "every measurement is a fresh subprocess.\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--isa", help="comma-separated: " + ", ".join(ISA_ENVS) + " (default: all three; native "
                   "only with --quick)")
    p.add_argument("--only", help="comma-separated row names of the plan to run (a check of the code paths: "
                   "the tables are printed and BENCHMARKS.md is left alone)")
    p.add_argument("--rounds", type=int, help=f"runs of each measurement (default {ROUNDS}; 1 with --quick)")
    p.add_argument("--section", help="name the BENCHMARKS.md section 'Speed: SECTION' (another machine's "
                   "figures beside the main ones, e.g. --section 'AMD EPYC, AVX2')")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_in_worker(args.worker)))
        return 0

    isas = (args.isa or ("native" if args.quick else ",".join(default_isas()))).split(",")
    unknown = [i for i in isas if i not in ISA_ENVS]
    if unknown:
        p.error(f"--isa: unknown {', '.join(unknown)} (expected {', '.join(ISA_ENVS)})")
    plan = make_plan(args.quick)
    if args.only:
        names = set(args.only.split(","))
        missing = names - {row[0] for row in plan}
        if missing:
            p.error(f"--only: no such row {', '.join(sorted(missing))} (rows: {', '.join(r[0] for r in plan)})")
        plan = [row for row in plan if row[0] in names]
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    start = time.perf_counter()
    settings = {}
    for isa in isas:
        settings[isa] = measure_setting(isa, plan, rounds)

    body = render(settings, rounds)
    out = ROOT / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("speed-partial.json" if args.only else "speed.json")).write_text(json.dumps(settings, indent=1))
    print(body)
    print(f"({(time.perf_counter() - start) / 60:.1f} min)")
    if args.only:
        return 0
    command = "python -m benchmarks.speed " + shlex.join(argv if argv is not None else sys.argv[1:])
    write_report(settings, isas, args.quick, command, body, args.section)
    return 0


def default_isas() -> list[str]:
    """The ISA settings worth measuring here: a cap at or above what the CPU has hides nothing, so on a
    CPU without AVX-512 (most laptops, AMD before Zen 4) both caps would re-measure `native`."""
    from lmforge.kernels import machine
    if "avx512f" in machine.info()["flags"]:
        return list(ISA_ENVS)
    return ["native"]


def write_report(settings: dict, isas: list[str], quick: bool, command: str, body: str,
                 section: str | None = None) -> None:
    """The BENCHMARKS.md section: machine line from the native workers, precision and kernels lines."""
    first = settings[isas[0]]["probe"]
    info = first.get("machine") if isas[0] == "native" else None
    native = settings.get("native", {}).get("results", {})
    auto = settings.get("native", {}).get("probe", {}).get("auto", {}).get("name")
    precision = ("fp32 rows: lmforge `--precision fp32`, baselines fp32; bf16 rows: lmforge `--precision auto`"
                 + (f" (natively {auto})" if auto else "")
                 + " against transformers + peft under `torch.autocast(\"cpu\", dtype=torch.bfloat16)`, run "
                 "where `auto` resolves to bf16")
    kernels = ((f"natively: {kernel_summary(merged_kernels(native))}" if native else "")
               + "; per ISA setting below (calibrated by lmforge.kernels in each setting)").lstrip("; ")
    if "native" in settings and isas == ["native"] and default_isas() == ["native"]:
        body = ("This CPU has no AVX-512, so the `avx512-vnni` and `avx2` caps would hide nothing: "
                "the `native` figures below are its AVX2 figures.\n\n" + body)
    name = "Speed" + (f": {section}" if section else "") + (" (quick)" if quick else "")
    write_section(name, command.strip(), body,
                  precision=precision, kernels=kernels, info=info)


if __name__ == "__main__":
    sys.exit(main())
