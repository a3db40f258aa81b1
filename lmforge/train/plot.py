"""PNGs of a run's curves against optimizer steps: fine-tuning (plot_metrics) and pre-training
(plot_pretraining)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


def _records(metrics_path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]


def _save(fig, out_png: str | Path, title: str) -> Path:
    """Title, layout, and the PNG written atomically (a killed run never leaves half an image)."""
    from lmforge.utils.atomic import atomic_file

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(out_png) as f:
        fig.savefig(f, format="png", dpi=100)
    _pyplot().close(fig)
    return Path(out_png)


def plot_metrics(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Fine-tuning: training loss, and each dev metric."""
    plt = _pyplot()
    records = _records(metrics_path)
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
    return _save(fig, out_png, title)


def plot_pretraining(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """curves.png: training loss, accuracies (masked tokens, next sentence), perplexity, tokens/s."""
    plt = _pyplot()
    records = _records(metrics_path)
    logs = [r for r in records if "lr" in r]
    if not logs:
        return None
    panels = [("training loss", ("loss", "mlm_loss", "nsp_loss", "clm_loss")),
              ("accuracy", ("mlm_accuracy", "nsp_accuracy")), ("perplexity", ("perplexity",)),
              ("tokens/s", ("tokens_per_s",))]
    panels = [(t, [k for k in keys if any(r.get(k) is not None for r in logs)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    if evals:
        panels.append(("validation", []))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in logs if r.get(k) is not None]
            ax.plot(*zip(*pts), label=k)
        if name == "validation":
            for k in ("loss", "mlm_accuracy", "nsp_accuracy"):
                pts = [(s, m[k]) for s, m in evals if m.get(k) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=k)
            ax.legend()
        ax.set(xlabel="step", title=name)
        if name == "perplexity":
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, out_png, title)
