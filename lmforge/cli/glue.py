"""Run GLUE tasks over seeds and write a LoRA-paper-Table-2-style Markdown table.

  lmforge glue --model minilm --method full --tasks cola,sst2,mrpc,stsb,rte --seeds 1,2,3 --out runs/glue-full
  lmforge glue --merge runs/glue-full runs/glue-features      # one table from several runs

OUT/results.json and OUT/table.md hold the results; each task and seed is a run under OUT/task/seedN
(an interrupted table resumes where it stopped when run again with the same options).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.validate import int_list
from lmforge.errors import ConfigError
from lmforge.utils.checks import POSITIVE


def add_parser(p) -> None:
    from lmforge.cli.finetune import add_data_args, add_train_args

    p.add_argument("--tasks", default="cola,sst2,mrpc,stsb,rte", type=_tasks)
    p.add_argument("--seeds", default="1,2,3", type=int_list)
    p.add_argument("--task-epochs", default="", metavar="TASK=N,...", type=_task_epochs,
                   help="per-task epochs overriding --epochs, e.g. sst2=1 (large tasks need fewer passes)")
    p.add_argument("--label", help="the table row's name (default: MODEL (METHOD))")
    p.add_argument("--merge", nargs="+", metavar="DIR", type=_results_dir,
                   help="only render one table from these result dirs")
    add_data_args(p)
    add_train_args(p)


def run(args) -> int:
    from lmforge.train.glue_table import read_results, render_table, run_glue

    if args.merge:
        print(render_table([read_results(f) for f in args.merge]), end="")
        return 0
    if not args.out:
        raise ConfigError("--out DIR is required")
    from lmforge.cli.finetune import config_from_args

    args.task = args.tasks[0]
    base = config_from_args(args)
    base.validate()  # before the first run directory is made
    results = run_glue(base, args.tasks, args.seeds, args.out, args.task_epochs, args.label)
    from lmforge.train.distributed import world
    if world().is_main:
        print(render_table([results]), end="")
    return 0


def _tasks(spec: str) -> list[str]:
    from lmforge.data.glue import get_task

    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError(f"must name at least one GLUE task, got {spec!r}")
    for t in tasks:
        try:
            get_task(t)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return tasks


def _task_epochs(spec: str) -> dict[str, float]:
    from lmforge.data.glue import get_task

    out = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        try:
            epochs = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected TASK=EPOCHS, e.g. sst2=1") from None
        why = POSITIVE.problem(epochs)
        if why:
            raise argparse.ArgumentTypeError(f"{item!r}: epochs {why}")
        try:
            get_task(name.strip())
        except ConfigError as e:
            raise argparse.ArgumentTypeError(f"{item!r}: {e}") from None
        out[name.strip()] = epochs
    return out


def _results_dir(d: str) -> Path:
    f = Path(d) / "results.json"
    if not f.is_file():
        raise argparse.ArgumentTypeError(f"{f}: not found (run `lmforge glue --out {d}` first)")
    return f
