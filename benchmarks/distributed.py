"""One process against two on this machine (torchrun, gloo), and what DDP sends per step (issue #15).

  python -m benchmarks.distributed            # 40 optimizer steps per run (about 6 minutes)
  python -m benchmarks.distributed --quick    # 10 steps per run (a check of the code paths)

Throughput: the same command (`lmforge finetune --model minilm --task glue/sst2`, full and LoRA; and
`lmforge pretrain --objective mlm` of a BERT `--size mini` on wikitext-2) once as one process with
torch's default threads (2 here) and once as `torchrun --nproc-per-node 2` with one thread per
process (torchrun's default), with the same global batch. Samples/s and tokens/s are the medians of
the trainer's own logged windows after the first (warm-up) one. Both sides run the plain PyTorch
kernels (`LMFORGE_KERNELS=plain`, what a run under torchrun uses) so that only the process count
differs.

Communication: the bytes DDP all-reduces per optimizer step, counted by a communication hook on the
real model (MiniLM, SST-2 batch of 32) for full fine-tuning and for LoRA (r=8 on q, v): DDP reduces
only parameters that require gradients, so LoRA's volume is its adapter's. A ring all-reduce moves
2 (N - 1) / N of that through each process's link per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import ROOT, write_section


def data_root() -> Path:
    for base in (os.environ.get("LMFORGE_DATA"), ROOT.parent / "shared" / "data"):
        if base and (Path(base) / "glue" / "SST-2").is_dir():
            return Path(base)
    raise SystemExit("benchmarks.distributed: GLUE SST-2 not found (set LMFORGE_DATA)")


def runs(steps: int, work: Path) -> list[tuple[str, list[str]]]:
    common = ["--max-steps", str(steps), "--precision", "fp32", "--no-progress", "--log-every", "5", "--seed", "1"]
    ft = ["finetune", "--model", "minilm", "--task", "glue/sst2", "--batch-size", "32", *common]
    return [
        ("Full fine-tuning, MiniLM, SST-2, batch 32", [*ft, "--method", "full"]),
        ("LoRA (r=8, q,v), MiniLM, SST-2, batch 32", [*ft, "--method", "lora", "--lora-r", "8", "--lr", "1e-3"]),
        ("MLM pre-training, BERT mini, wikitext-2, batch 32 x 128", [
            "pretrain", "--arch", "bert", "--size", "mini", "--objective", "mlm",
            "--corpus", str(data_root() / "wikitext-2"), "--cache-dir", str(work / "shards"),
            "--max-seq-len", "128", "--batch-size", "32", "--save-every", "100000", *common]),
    ]


def measure(args: list[str], out: Path, processes: int) -> dict:
    env = {**os.environ, "LMFORGE_KERNELS": "plain"}
    if processes == 1:
        cmd = [sys.executable, "-m", "lmforge", *args, "--out", str(out)]
        env.pop("OMP_NUM_THREADS", None)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "lmforge", *args, "--out", str(out)]
        env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"benchmarks.distributed: {' '.join(cmd[:8])} ... failed:\n{p.stderr[-2000:]}")
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    windows = [r for r in logged if "samples_per_s" in r][1:]   # the first window warms up
    if not windows:
        raise SystemExit(f"benchmarks.distributed: {out}: no timed windows (too few --steps)")
    result = {"samples_per_s": statistics.median(r["samples_per_s"] for r in windows)}
    if all("tokens_per_s" in r for r in windows):
        result["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in windows)
    return result


def comm_volume() -> dict[str, dict]:
    """Bytes DDP all-reduces per optimizer step, full fine-tuning and LoRA, counted by a comm hook
    (in a process group of one: DDP still buckets and reduces every gradient)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.adapters.methods import MethodConfig, apply_method
    from lmforge.data.batches import Encoded, collate_packed, model_inputs
    from lmforge.models import from_pretrained, routing
    from benchmarks.speed import sst2_batches

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ["LMFORGE_KERNELS"] = "plain"
    dist.init_process_group("gloo", rank=0, world_size=1)
    out = {}
    try:
        ids, labels = sst2_batches("sst2", 1)[0]
        for method in ("full", "lora"):
            model = from_pretrained("minilm", head="classification", num_labels=2)
            spec = apply_method(model, MethodConfig(method=method, lora_r=8, lora_alpha=16))
            adapter = getattr(spec, "adapter", None)
            counted = {"bytes": 0}

            def hook(state, bucket):
                counted["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
                return default_hooks.allreduce_hook(state, bucket)

            ddp = DDP(model)
            ddp.register_comm_hook(dist.group.WORLD, hook)
            b = collate_packed([Encoded(x, [0] * len(x), y) for x, y in zip(ids, labels)])
            with routing.using(adapter) if adapter else contextlib.nullcontext():
                F.cross_entropy(ddp(**model_inputs(b)).logits, b["labels"]).backward()
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            out[method] = {**counted, "trainable": trainable}
    finally:
        dist.destroy_process_group()
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def render(results: list[dict], comm: dict, steps: int) -> str:
    lines = ["| run | 1 process (2 threads) | 2 processes (1 thread each) | 2 / 1 |", "|---|---:|---:|---:|"]
    for r in results:
        for key, unit in (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s")):
            if key in r["one"] and key in r["two"]:
                lines.append(f"| {r['name']} ({unit}) | {r['one'][key]:,.1f} | {r['two'][key]:,.1f} | "
                             f"**{r['two'][key] / r['one'][key]:.2f}x** |")
    lines += ["", f"{steps} optimizer steps per run, the same global batch; medians of the trainer's logged "
              "windows after the first. Plain PyTorch kernels on both sides (`LMFORGE_KERNELS=plain`, as under "
              "torchrun). What 2 cores allow: one process already uses both cores through its 2 threads, so two "
              "processes of one thread each can at best match it; they add the gradient all-reduce (gloo, over "
              "loopback) and lose what one bigger GEMM gains over two halves. The point on this machine is "
              "that the same run gives the same weights (tests/test_distributed.py), not speed; the speed-up "
              "comes from more cores or machines.", "",
              "| what DDP all-reduces per optimizer step | trainable parameters | bytes reduced |",
              "|---|---:|---:|"]
    for method, label in (("full", "Full fine-tuning (MiniLM + classifier)"), ("lora", "LoRA r=8 on q, v")):
        c = comm[method]
        lines.append(f"| {label} | {c['trainable']:,} | {mb(c['bytes'])} |")
    ratio = comm["full"]["bytes"] / comm["lora"]["bytes"]
    lines += ["", f"LoRA sends **{ratio:,.0f}x** less per step than full fine-tuning: DDP registers its hooks on "
              "parameters that require gradients only, so the frozen base is never communicated. (A ring "
              "all-reduce over N processes sends 2 (N - 1) / N of the buffer per process: 1x for N = 2.) "
              "Counted by a DDP communication hook on one SST-2 batch."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 40, --quick 10)")
    p.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    steps = args.steps or (10 if args.quick else 40)
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-dist-"))
    try:
        results = []
        for name, cmd in runs(steps, work):
            one = measure(cmd, work / f"one-{len(results)}", 1)
            two = measure(cmd, work / f"two-{len(results)}", 2)
            results.append({"name": name, "one": one, "two": two})
            print(name, one, two, flush=True)
        comm = comm_volume()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = render(results, comm, steps)
    print(body)
    if not args.no_write:
        command = "python -m benchmarks.distributed" + (" --quick" if args.quick else "")
        write_section("1 against 2 processes", command, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
