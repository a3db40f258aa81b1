"""SST-2 dev accuracy cost of `--quantize int8`, over every fine-tuned SST-2 model benchmarks.glue left.

  python -m benchmarks.int8                 # runs/bench/glue-{lora,lora-long,full}/sst2/seed*/best
  python -m benchmarks.int8 --runs DIR ...  # any run directories (their best/ is used)
  python -m benchmarks.int8 --quick         # the runs of `benchmarks.glue --quick`

One model's accuracy moves by single sentences (0.11 points each on 872), so the cost is reported
per model and as the mean over all of them, with the agreement of int8 and fp32 predictions. Speed
on the same evaluation (batches of 32, one process, the three variants interleaved) is a cross-check
of `benchmarks.speed`'s int8 row, which is the measurement against the target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.report import ROOT, cached_kernels, write_section

VARIANTS = {"fp32": None, "int8": (), "int8-keep": ("output",)}  # int8-keep: the FFN output in fp32


def _evaluate(run_dirs):
    import torch

    from lmforge.data.batches import encode_examples
    from lmforge.data.glue import get_task, load_split
    from lmforge.infer.classify import Classifier, predict_logits
    from lmforge.infer.quantize import quantize_int8

    dev = load_split(get_task("sst2"), "dev", None)
    labels = torch.tensor([e.label for e in dev])
    rows, speed = [], {}
    for i, run in enumerate(run_dirs):
        models, preds, enc = {}, {}, None
        for kind, keep in VARIANTS.items():
            clf = Classifier(run / "best")  # a fresh copy per variant: quantization is in place
            if keep is not None:
                quantize_int8(clf.model, keep_fp32=keep)
            enc = enc or encode_examples(clf.tokenizer, dev, 128)  # one run, one tokenizer: encode once
            preds[kind] = predict_logits(clf.model, enc, clf.tokenizer.pad_token_id, 32).argmax(-1)
            models[kind] = (clf, enc)
        row = {"run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run)}
        for kind, p in preds.items():
            row[kind] = 100 * float((p == labels).float().mean())
            row[kind + "_agree"] = 100 * float((p == preds["fp32"]).float().mean())
        rows.append(row)
        if i == 0:  # speed on the first model, variants interleaved so drift hits all alike
            times = {k: [] for k in models}
            for _ in range(3):
                for kind, (clf, enc) in models.items():
                    t = time.perf_counter()
                    predict_logits(clf.model, enc, clf.tokenizer.pad_token_id, 32)
                    times[kind].append(time.perf_counter() - t)
            speed = {k: len(dev) / min(v) for k, v in times.items()}
    return rows, speed


def _sts_embeddings() -> dict:
    """all-MiniLM-L6-v2 as a sentence embedder: STS-B dev Spearman of cosine similarities, fp32 and int8."""
    from scipy.stats import spearmanr

    from lmforge.data.glue import get_task, load_split
    from lmforge.infer.embed import Embedder

    dev = load_split(get_task("stsb"), "dev", None)
    out = {}
    for kind in ("fp32", "int8"):
        e = Embedder("minilm", quantize=None if kind == "fp32" else kind)
        a, b = e.embed([x.text for x in dev]), e.embed([x.pair for x in dev])
        out[kind] = 100 * spearmanr((a * b).sum(1).numpy(), [x.label for x in dev])[0]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", help="run directories (default: the SST-2 runs of benchmarks.glue)")
    p.add_argument("--quick", action="store_true", help="the SST-2 runs of `benchmarks.glue --quick`")
    args = p.parse_args(argv)
    tag = "-quick" if args.quick else ""
    runs = [Path(r) for r in args.runs] if args.runs else sorted(
        d for m in ("lora", "lora-long", "full")
        for d in (ROOT / "runs" / "bench" / f"glue-{m}{tag}" / "sst2").glob("seed*") if (d / "best").is_dir())
    if not runs:
        sys.exit("no fine-tuned SST-2 runs found: run `python -m benchmarks.glue` first, or pass --runs")
    rows, speed = _evaluate(runs)
    lines = ["| model | fp32 | int8 (default) | agreement | int8, FFN output kept fp32 | agreement |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['fp32']:.2f} | {r['int8']:.2f} ({r['int8'] - r['fp32']:+.2f}) | "
                     f"{r['int8_agree']:.1f}% | {r['int8-keep']:.2f} ({r['int8-keep'] - r['fp32']:+.2f}) | "
                     f"{r['int8-keep_agree']:.1f}% |")
    cost = {k: statistics.mean(r[k] - r["fp32"] for r in rows) for k in ("int8", "int8-keep")}
    body = ("SST-2 dev accuracy (x100) of each fine-tuned model, fp32 and with the base quantized "
            "(`--quantize int8`: every trunk projection, weights per output channel, inputs per tensor; and with "
            "`keep_fp32=(\"output\",)`); agreement = share of dev sentences with the fp32 prediction.\n\n"
            + "\n".join(lines) +
            f"\n\nMean accuracy change over {len(rows)} models: **int8 {cost['int8']:+.2f} points**; with the FFN "
            f"output kept fp32 {cost['int8-keep']:+.2f}.\n\n"
            f"Speed on the same evaluation ({rows[0]['run']}, batches of 32, one process): fp32 "
            f"{speed['fp32']:.0f} seq/s, int8 {speed['int8']:.0f} ({speed['int8'] / speed['fp32']:.2f}x), FFN "
            f"output kept fp32 {speed['int8-keep']:.0f} ({speed['int8-keep'] / speed['fp32']:.2f}x).\n")
    command = "python -m benchmarks.int8" + (" --runs ..." if args.runs else "") + (" --quick" if args.quick else "")
    sts = _sts_embeddings()
    body += (f"\nSentence embeddings (all-MiniLM-L6-v2 itself, `lmforge embed --quantize int8`): STS-B dev Spearman of "
             f"cosine similarities {sts['fp32']:.2f} in fp32, {sts['int8']:.2f} in int8 "
             f"({sts['int8'] - sts['fp32']:+.2f}).\n")
    write_section("int8 accuracy cost" + (" (quick)" if args.quick else ""), command, body,
                  precision="fp32 (inference, no autocast) against int8 dynamic quantization of the base",
                  kernels=cached_kernels())
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
