"""The quality cost of `--precision bf16` (what `auto` picks on CPUs with AMX or AVX512_BF16): SST-2
dev accuracy after full fine-tuning and LoRA, fp32 against bf16, the same seeds (issue #13: within 0.3
points of fp32). The embedding side is benchmarks/embed_bf16.py.

  python -m benchmarks.bf16_quality            # all SST-2 training rows, 1 epoch, seeds 1,2,3
  python -m benchmarks.bf16_quality --quick    # 4,000 rows, seeds 1,2
  python -m benchmarks.bf16_quality --samples 20000   # 20,000 rows, seeds 1,2,3

Each run is an ordinary `lmforge finetune` under runs/bench/bf16-quality/, so a rerun reuses finished
runs. bf16 runs keep fp32 master weights and AdamW state (autocast around forward and backward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchmarks.report import ROOT, cached_kernels, trainer_precision, write_section

RECIPES = {
    "full": ["--method", "full", "--lr", "1e-4", "--epochs", "1", "--batch-size", "32", "--warmup-ratio", "0.06"],
    "lora": ["--method", "lora", "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-3", "--epochs", "1",
             "--batch-size", "32", "--warmup-ratio", "0.06"],
}
BOUND = 0.3   # points of dev accuracy


def finetune(out, method: str, seed: int, precision: str, extra: list[str]) -> dict:
    summary = out / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "lmforge", "finetune", "--model", "minilm", "--task", "glue/sst2",
               "--seed", str(seed), "--out", str(out), "--no-progress", "--precision", precision,
               *RECIPES[method], *extra]
        subprocess.run(cmd + (["--resume"] if (out / "checkpoint").is_dir() else []), check=True)
    return json.loads(summary.read_text())


def _paired(a: list[float], b: list[float]) -> str:
    if len(a) < 2:
        return ""
    from scipy.stats import ttest_rel
    p = ttest_rel(a, b).pvalue
    return f"paired t-test over seeds p = {p:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--samples", type=int, help="train on the first N shuffled SST-2 rows (default: all)")
    args = p.parse_args(argv)
    seeds, extra = ([1, 2], ["--max-train-samples", "4000"]) if args.quick else ([1, 2, 3], [])
    if args.samples:
        extra = ["--max-train-samples", str(args.samples)]
    bf16 = trainer_precision("auto")
    if "bf16" not in bf16:
        print(f"auto is not bf16 on this machine ({bf16}): nothing to compare", file=sys.stderr)
        return 0
    tag = "quick" if args.quick else f"{args.samples}" if args.samples else "all"
    base = ROOT / "runs" / "bench" / f"bf16-quality-{tag}"
    rows, verdicts = [], []
    for method in args.methods.split(","):
        acc: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for seed in seeds:
            for precision in ("fp32", "bf16"):
                s = finetune(base / f"{method}-{precision}-seed{seed}", method, seed, precision, extra)
                resolved = s.get("precision", precision)
                acc[precision].append(100 * s["best"]["accuracy"])
                rows.append(f"| {method} | {seed} | {resolved} | {100 * s['best']['accuracy']:.2f} | "
                            f"{s['wall_time_s'] / 60:.1f} min |")
        diff = statistics.mean(acc["bf16"]) - statistics.mean(acc["fp32"])
        met = abs(diff) <= BOUND or diff > 0
        verdicts.append(
            f"- {method}: mean fp32 {statistics.mean(acc['fp32']):.2f}, bf16 {statistics.mean(acc['bf16']):.2f}, "
            f"difference {diff:+.2f} points (target: no more than {BOUND} below fp32: "
            f"**{'met' if met else 'missed'}**); seed-to-seed range fp32 {max(acc['fp32']) - min(acc['fp32']):.2f}, "
            f"bf16 {max(acc['bf16']) - min(acc['bf16']):.2f}; {_paired(acc['bf16'], acc['fp32'])}")
    body = (
        "SST-2 dev accuracy, each seed trained twice: `--precision fp32` and `--precision bf16` (bf16 "
        "autocast, fp32 master weights and optimizer state). Recipes:\n\n" +
        "\n".join(f"- {m}: `" + " ".join(RECIPES[m] + extra) + "`" for m in args.methods.split(",")) +
        "\n\n| method | seed | precision | dev accuracy | wall time (train + evals) |\n|---|---|---|---|---|\n" +
        "\n".join(rows) + "\n\n" + "\n".join(verdicts) + "\n")
    command = "python -m benchmarks.bf16_quality" + (" --quick" if args.quick else "") + \
        (f" --samples {args.samples}" if args.samples else "")
    title = " (quick)" if args.quick else f" ({args.samples:,} training sentences)" if args.samples else ""
    write_section("bf16 quality on SST-2" + title, command, body,
                  precision=bf16, kernels=cached_kernels())
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
