"""Same quality on the fast paths: LoRA on SST-2 packed (unpadded) vs padded, same seeds; and the
SST-2 dev accuracy cost of int8 dynamic quantization, with its inference speed-up.

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
import time

from benchmarks.report import ROOT, write_section

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


def int8_cost(run_dir) -> dict:
    """Dev accuracy and eval speed of the run's best adapter, fp32 and with the base in int8."""
    import torch

    from lmforge.data.batches import encode_examples
    from lmforge.data.glue import get_task, load_split
    from lmforge.infer.classify import Classifier, predict_logits
    from lmforge.infer.quantize import quantize_int8

    task = get_task("sst2")
    dev = load_split(task, "dev", None)
    labels = torch.tensor([e.label for e in dev])
    out = {}
    for kind in ("fp32", "int8", "int8-all"):
        clf = Classifier(run_dir / "best")
        if kind.startswith("int8"):
            quantize_int8(clf.model, **({"keep_fp32": ()} if kind == "int8-all" else {}))
        enc = encode_examples(clf.tokenizer, dev, 128)
        predict_logits(clf.model, enc[:256], clf.tokenizer.pad_token_id, 32)  # warm-up
        t = time.perf_counter()
        logits = predict_logits(clf.model, enc, clf.tokenizer.pad_token_id, 32)
        dt = time.perf_counter() - t
        out[kind] = {"accuracy": float((logits.argmax(-1) == labels).float().mean()), "seqs_per_s": len(dev) / dt}
    return out


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
    q = int8_cost(base / f"packed-seed{seeds[0]}")
    body = (
        "LoRA (r=8, alpha=16, W_q and W_v) on SST-2, `" + " ".join(RECIPE + extra) + "`:\n\n"
        "| seed | execution | dev accuracy | wall time (train + evals) |\n|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\nMean dev accuracy: packed {statistics.mean(acc['packed']):.2f}, padded "
        f"{statistics.mean(acc['padded']):.2f} (difference "
        f"{statistics.mean(acc['packed']) - statistics.mean(acc['padded']):+.2f} points; the two paths differ "
        "only in dropout masks, which are drawn per token).\n\n"
        f"int8 dynamic quantization of the base (seed {seeds[0]}'s packed adapter, SST-2 dev, batches of 32): "
        f"accuracy {100 * q['fp32']['accuracy']:.2f} -> {100 * q['int8']['accuracy']:.2f} "
        f"({100 * (q['int8']['accuracy'] - q['fp32']['accuracy']):+.2f} points), "
        f"{q['fp32']['seqs_per_s']:.0f} -> {q['int8']['seqs_per_s']:.0f} seq/s "
        f"(**{q['int8']['seqs_per_s'] / q['fp32']['seqs_per_s']:.2f}x**; the FFN output projection kept fp32, "
        f"the default). Every projection in int8: {100 * q['int8-all']['accuracy']:.2f} "
        f"({100 * (q['int8-all']['accuracy'] - q['fp32']['accuracy']):+.2f} points), "
        f"**{q['int8-all']['seqs_per_s'] / q['fp32']['seqs_per_s']:.2f}x**.\n")
    command = "python -m benchmarks.quality" + (" --quick" if args.quick else "")
    write_section("Quality of the fast paths" + (" (quick)" if args.quick else ""), command, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
