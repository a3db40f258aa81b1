"""A PNG of a run's curves: training loss, and each dev metric, against optimizer steps."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    from lmforge.utils.atomic import atomic_file

    records = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    if not train and not evals:
        return None
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax_loss.plot(*zip(*train), color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    names = sorted({k for _, m in evals for k, v in m.items() if isinstance(v, (int, float))})
    for name in names:
        pts = [(s, m[name]) for s, m in evals if name in m]
        ax_eval.plot(*zip(*pts), marker="o", label=name)
    ax_eval.set(xlabel="step", ylabel="dev metric", title="dev metrics")
    if names:
        ax_eval.legend()
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(out_png) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return Path(out_png)
