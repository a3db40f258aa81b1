"""Run GLUE tasks over seeds and write a results table in the layout of the LoRA paper's Table 2:
one row per model and method, the trainable parameters, each task's metric (median over seeds,
x100), and the average. Each (task, seed) is an ordinary fine-tuning run under OUT/task/seedN, so
an interrupted table resumes: finished runs are kept, unfinished ones resume from their checkpoint.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

from lmforge.data.glue import get_task
from lmforge.data.tables import read_text_file
from lmforge.errors import DataError
from lmforge.train import distributed
from lmforge.train.finetune import FinetuneConfig, run_finetune
from lmforge.utils import strict_json
from lmforge.utils.atomic import atomic_file

# The paper's column names and the metric it reports for each task.
COLUMNS = {"mnli": "MNLI", "sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "qnli": "QNLI", "qqp": "QQP",
           "rte": "RTE", "stsb": "STS-B", "wnli": "WNLI"}
PAPER_ORDER = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb", "wnli"]


def run_glue(base: FinetuneConfig, tasks: list[str], seeds: list[int], out: str | Path,
             task_epochs: dict[str, float] | None = None, label: str | None = None) -> dict:
    """task_epochs overrides base.train.epochs per task (big tasks such as SST-2 need fewer passes);
    label names the table row (default "model (method)")."""
    out = Path(out)
    task_epochs = {get_task(k).name: v for k, v in (task_epochs or {}).items()}
    from lmforge.kernels import resolve_device

    distributed.init(resolve_device(base.train.device))   # under torchrun, rank 0 decides what is done
    runs = []
    for name in tasks:
        task = get_task(name)
        for seed in seeds:
            run_dir = out / task.name / f"seed{seed}"
            summary_file = run_dir / "summary.json"
            if distributed.from_main(summary_file.is_file()):   # rank 0's run directory decides
                summary = distributed.from_main(read_json(summary_file) if distributed.world().is_main else None)
            else:
                cfg = copy.deepcopy(base)
                cfg.task = f"glue/{task.name}"
                cfg.train.seed = seed
                cfg.train.out_dir = str(run_dir)
                cfg.train.epochs = task_epochs.get(task.name, cfg.train.epochs)
                if distributed.world().is_main:
                    print(f"== glue/{task.name} seed {seed} -> {run_dir}", flush=True)
                summary = run_finetune(cfg, resume=(run_dir / "checkpoint").is_dir())
            runs.append(summary)
    results = {"model": base.model, "method": base.adapt.method, "seeds": seeds, "runs": runs}
    if label:
        results["label"] = label
    if not distributed.world().is_main:   # rank 0 alone writes
        return results
    with atomic_file(out / "results.json", "w") as f:
        strict_json.dump(results, f, indent=1)
    table = render_table([results])
    with atomic_file(out / "table.md", "w") as f:
        f.write(table)
    return results


def read_json(path: Path):
    """A JSON file lmforge wrote, or a DataError naming the file and line (not UTF-8, invalid JSON)."""
    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


RUN_KEYS = ("task", "main_metric", "best", "wall_time_s", "trainable_params")


def read_results(path: Path) -> dict:
    """OUT/results.json of `lmforge glue --out OUT`, checked for what render_table reads."""
    res = read_json(path)
    if not isinstance(res, dict) or not isinstance(res.get("runs"), list):
        raise DataError(f"{path}: expected a JSON object with a list \"runs\" (as `lmforge glue --out` writes it)")
    for key in ("model", "method", "seeds"):
        if key not in res:
            raise DataError(f"{path}: missing key {key!r}")
    for i, run in enumerate(res["runs"]):
        missing = [k for k in RUN_KEYS if k not in run] if isinstance(run, dict) else ["an object"]
        if missing:
            raise DataError(f"{path}: runs[{i}]: expected an object with {', '.join(RUN_KEYS)}; "
                            f"missing {missing[0]!r}")
        if not isinstance(run["best"], dict) or not isinstance(run["best"].get(run["main_metric"]), (int, float)):
            raise DataError(f"{path}: runs[{i}].best has no number for its main metric {run['main_metric']!r}")
    return res


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def summarize(results: dict) -> dict:
    """Per task: the median main metric (x100) over seeds, every seed's value, and wall time."""
    by_task: dict[str, dict] = {}
    for r in results["runs"]:
        task = r["task"].removeprefix("glue/")
        t = by_task.setdefault(task, {"values": [], "wall": [], "metric": r["main_metric"]})
        t["values"].append(100 * r["best"][r["main_metric"]])
        t["wall"].append(r["wall_time_s"])
    for t in by_task.values():
        t["median"] = statistics.median(t["values"])
    return by_task


def render_table(all_results: list[dict]) -> str:
    """A Markdown table with one row per (model, method), columns in the paper's task order."""
    tasks = [t for t in PAPER_ORDER if any(
        r["task"].removeprefix("glue/") == t for res in all_results for r in res["runs"])]
    head = "| Model & Method | # Trainable Parameters | " + " | ".join(COLUMNS[t] for t in tasks) + " | Avg. |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    timing = []
    for res in all_results:
        s = summarize(res)
        params = _params(res["runs"][0]["trainable_params"]) if res["runs"] else "-"
        cells = [f"{s[t]['median']:.1f}" if t in s else "-" for t in tasks]
        done = [s[t]["median"] for t in tasks if t in s]
        avg = f"{statistics.mean(done):.1f}" if done else "-"
        label = res.get("label") or f"{res['model']} ({res['method']})"
        lines.append(f"| {label} | {params} | " + " | ".join(cells) + f" | {avg} |")
        # the median run, not the sum: one run slowed by something else on the machine moves it least
        timing.append(f"- {label}: " + ", ".join(
            f"{COLUMNS[t]} {statistics.median(s[t]['wall']) / 60:.1f} min" for t in tasks if t in s))
    metric_note = ", ".join(f"{COLUMNS[t]} {m}" for t, m in
                            ((t, get_task(t).main_metric) for t in tasks))
    seeds = sorted({len(res["seeds"]) for res in all_results})
    return "\n".join(lines) + (
        f"\n\nMedian over {'/'.join(map(str, seeds))} seeds, dev sets, x100. Metrics: {metric_note}.\n"
        "Wall time on this machine, one run (train + evaluations; the median over seeds):\n" + "\n".join(timing) + "\n")
