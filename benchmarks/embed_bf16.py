"""The bf16 quality cost for sentence embeddings: all-MiniLM-L6-v2 on the STS-B dev sentences, fp32
against bf16 compute.

  python -m benchmarks.embed_bf16       # 3,000 sentences (both columns of STS-B dev), about a minute

Every sentence is embedded twice with `lmforge.infer.embed.Embedder("minilm")`: in fp32, then with
bf16 compute (`Embedder(..., precision="bf16")` where Embedder takes it, else its forward run under
`resolve_precision("bf16", cpu).autocast(cpu)`: bf16 matrix multiplies and attention, fp32 weights,
LayerNorms and pooling). Reported: the cosine between each sentence's two vectors (min, 1st
percentile, mean; target: min at least 0.999) and the STS-B dev Spearman of each (cosine of the pair
against the gold score, x100). Written to BENCHMARKS.md ("Embeddings in bf16") and
runs/bench/embed_bf16.json.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import time

from benchmarks.report import ROOT, kernel_summary, write_section
from benchmarks.speed import WORKER_FACTS, data_root, record_kernels

TARGET_MIN = 0.999


def stsb_dev() -> tuple[list[str], list[str], list[float]]:
    lines = (data_root() / "glue" / "STS-B" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    i1, i2, isc = header.index("sentence1"), header.index("sentence2"), header.index("score")
    rows = [ln.split("\t") for ln in lines[1:] if ln.strip()]
    return [r[i1] for r in rows], [r[i2] for r in rows], [float(r[isc]) for r in rows]


def embed_all(precision: str, texts: list[str]):
    """(vectors [N, D] fp32, how the precision was applied, resolved Precision, seconds)."""
    import torch

    from lmforge.infer.embed import Embedder
    from lmforge.kernels import resolve_precision

    cpu = torch.device("cpu")
    p = resolve_precision(precision, cpu)
    if "precision" in inspect.signature(Embedder).parameters:
        embedder, ctx = Embedder("minilm", precision=precision), contextlib.nullcontext()
        how = f'Embedder("minilm", precision="{precision}")'
    else:
        embedder, ctx = Embedder("minilm"), p.autocast(cpu)
        how = f'Embedder("minilm").embed under resolve_precision("{precision}", cpu).autocast(cpu)'
    with ctx:
        embedder.embed(texts[:256])   # warm-up: kernel choices for these shapes made (or read) before timing
        t = time.perf_counter()
        vectors = embedder.embed(texts)
    return vectors.float(), how, p, time.perf_counter() - t


def spearman(a, b, scores) -> float:
    from scipy.stats import spearmanr
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)
    return 100 * float(spearmanr(cos.tolist(), scores).statistic)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the same run (it is already short); for make bench")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    import torch

    record_kernels()   # which kernel ran each op, as benchmarks.speed's workers record it
    s1, s2, scores = stsb_dev()
    texts = s1 + s2
    n = len(s1)
    fp32, _, _, t32 = embed_all("fp32", texts)
    bf16, how, prec, t16 = embed_all("bf16", texts)
    cos = torch.nn.functional.cosine_similarity(fp32, bf16, dim=-1)
    stats = {"sentences": len(texts), "pairs": n, "cos_min": cos.min().item(), "cos_mean": cos.mean().item(),
             "cos_p1": torch.quantile(cos.double(), 0.01).item(), "cos_median": cos.median().item(),
             "below_target": int((cos < TARGET_MIN).sum()),
             "spearman_fp32": spearman(fp32[:n], fp32[n:], scores),
             "spearman_bf16": spearman(bf16[:n], bf16[n:], scores),
             "seconds_fp32": t32, "seconds_bf16": t16, "bf16": {"how": how, "name": prec.name, "why": prec.why}}
    worst = int(cos.argmin())
    stats["worst_sentence"] = texts[worst]
    out = ROOT / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "embed_bf16.json").write_text(json.dumps(stats, indent=1))
    met = "met" if stats["cos_min"] >= TARGET_MIN else "**missed**"
    body = (
        f"all-MiniLM-L6-v2 on the {n} STS-B dev pairs ({len(texts)} sentences, both columns), embedded in fp32 "
        f"and with bf16 compute (`{how}`; {prec.why}).\n\n"
        "| cosine(fp32 vector, bf16 vector) over the sentences | value |\n|---|---:|\n"
        f"| minimum | {stats['cos_min']:.5f} |\n| 1st percentile | {stats['cos_p1']:.5f} |\n"
        f"| median | {stats['cos_median']:.5f} |\n| mean | {stats['cos_mean']:.5f} |\n\n"
        f"Target: minimum at least {TARGET_MIN} — **{stats['cos_min']:.5f}, {met}** "
        f"({stats['below_target']} of {len(texts)} sentences below it).\n\n"
        "| STS-B dev Spearman (x100, cosine of the pair against the gold score) | fp32 | bf16 | change |\n"
        "|---|---:|---:|---:|\n"
        f"| all-MiniLM-L6-v2 | {stats['spearman_fp32']:.2f} | {stats['spearman_bf16']:.2f} | "
        f"{stats['spearman_bf16'] - stats['spearman_fp32']:+.2f} |\n\n"
        "Quality only: the speed of bf16 is `python -m benchmarks.speed`'s (this run's wall times, one pass each, "
        "are in runs/bench/embed_bf16.json).\n")
    print(body)
    if not args.no_write:
        write_section("Embeddings in bf16", "python -m benchmarks.embed_bf16", body,
                      precision=f"fp32 against bf16 ({how})", info=None,
                      kernels=kernel_summary(WORKER_FACTS.get("kernels_used", {})) + " (both runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
