"""Same quality on the fast paths: LoRA on SST-2 packed (unpadded) vs padded, same seeds (the int8
cost is benchmarks/int8.py).

  python -m benchmarks.quality            # all SST-2 training rows, 1 epoch, seeds 1,2,3
  python -m benchmarks.quality --quick    # 4,000 rows, seeds 1,2

Each run is an ordinary `lmforge finetune` under runs/bench/quality/, so a rerun reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys

from benchmarks.report import ROOT, cached_kernels, trainer_precision, write_section

RECIPE = ["--method", "lora", "--lora-r", "8", "--lora-alpha", "16", "--lr", "1e-3", "--epochs", "1",
          "--batch-size", "32", "--warmup-ratio", "0.06"]


def _same_as_glue_run(out, seed: int, padded: bool, extra: list[str]) -> None:
    """The packed runs are the LoRA rows of `benchmarks.glue` (same recipe, same seeds): copy a
    finished one instead of training it again."""
    src = ROOT / "runs" / "bench" / "glue-lora" / "sst2" / f"seed{seed}"
    if padded or extra or out.exists() or not (src / "summary.json").is_file():
        return
    cfg = json.loads((src / "run.json").read_text())
    t, a = cfg["train"], cfg["adapt"]
    if (a["method"], a["lora_r"], a["lora_alpha"], t["lr"], t["epochs"], t["batch_size"], t["warmup_ratio"],
            cfg["packed"], cfg["max_train_samples"]) == ("lora", 8, 16.0, 1e-3, 1.0, 32, 0.06, True, None):
        shutil.copytree(src, out)


def finetune(out, seed: int, padded: bool, extra: list[str]) -> dict:
    _same_as_glue_run(out, seed, padded, extra)
    summary = out / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "lmforge", "finetune", "--model", "minilm", "--task", "glue/sst2",
               "--seed", str(seed), "--out", str(out), "--no-progress", *RECIPE, *extra]
        subprocess.run(cmd + (["--padded"] if padded else []) + (["--resume"] if (out / "checkpoint").is_dir()
                                                                  else []), check=True)
    return json.loads(summary.read_text())


def _noise(acc: dict) -> str:
    """How the packed-padded difference compares with the seed-to-seed spread: a paired t-test over seeds."""
    if len(acc["packed"]) < 2:
        return ""
    from scipy.stats import ttest_rel
    p = ttest_rel(acc["packed"], acc["padded"]).pvalue
    spread = {m: max(v) - min(v) for m, v in acc.items()}
    return (f"Seed-to-seed range: packed {spread['packed']:.2f}, padded {spread['padded']:.2f} points; paired "
            f"t-test over the seeds p = {p:.2f} ({'no' if p > 0.05 else 'a'} significant difference at 5%).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    seeds, extra = ([1, 2], ["--max-train-samples", "4000"]) if args.quick else ([1, 2, 3], [])
    base = ROOT / "runs" / "bench" / ("quality-quick" if args.quick else "quality")
    rows, acc = [], {"packed": [], "padded": []}
    for seed in seeds:
        for mode in ("packed", "padded"):
            s = finetune(base / f"{mode}-seed{seed}", seed, mode == "padded", extra)
            acc[mode].append(100 * s["best"]["accuracy"])
            rows.append(f"| {seed} | {mode} | {100 * s['best']['accuracy']:.2f} | {s['wall_time_s'] / 60:.1f} min |")
    body = (
        "LoRA (r=8, alpha=16, W_q and W_v) on SST-2, `" + " ".join(RECIPE + extra) + "`:\n\n"
        "| seed | execution | dev accuracy | wall time (train + evals) |\n|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\nMean dev accuracy: packed {statistics.mean(acc['packed']):.2f}, padded "
        f"{statistics.mean(acc['padded']):.2f} (difference "
        f"{statistics.mean(acc['packed']) - statistics.mean(acc['padded']):+.2f} points; the two paths differ "
        "only in dropout masks, which are drawn per token). " + _noise(acc) +
        " The int8 cost is `python -m benchmarks.int8`.\n")
    command = "python -m benchmarks.quality" + (" --quick" if args.quick else "")
    write_section("Quality of the fast paths" + (" (quick)" if args.quick else ""), command, body,
                  precision=trainer_precision("auto"), kernels=cached_kernels())
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
