"""Run GLUE tasks over seeds and write a LoRA-paper-Table-2-style Markdown table.

  lmforge glue --model minilm --method full --tasks cola,sst2,mrpc,stsb,rte --seeds 1,2,3 --out runs/glue-full
  lmforge glue --merge runs/glue-full runs/glue-features      # one table from several runs

OUT/results.json and OUT/table.md hold the results; each task and seed is a run under OUT/task/seedN
(an interrupted table resumes where it stopped when run again with the same options).
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import ConfigError


def add_parser(p) -> None:
    from lmforge.cli.finetune import add_data_args, add_train_args

    p.add_argument("--tasks", default="cola,sst2,mrpc,stsb,rte")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--task-epochs", default="", metavar="TASK=N,...",
                   help="per-task epochs overriding --epochs, e.g. sst2=1 (large tasks need fewer passes)")
    p.add_argument("--label", help="the table row's name (default: MODEL (METHOD))")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="only render one table from these result dirs")
    add_data_args(p)
    add_train_args(p)


def run(args) -> int:
    from lmforge.train.glue_table import render_table, run_glue

    if args.merge:
        results = []
        for d in args.merge:
            f = Path(d) / "results.json"
            if not f.is_file():
                raise ConfigError(f"{f}: not found (run `lmforge glue --out {d}` first)")
            results.append(json.loads(f.read_text()))
        print(render_table(results), end="")
        return 0
    if not args.out:
        raise ConfigError("--out DIR is required")
    from lmforge.cli.finetune import config_from_args

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    tasks = [t for t in args.tasks.split(",") if t]
    args.task = tasks[0]
    results = run_glue(config_from_args(args), tasks, seeds, args.out, _task_epochs(args.task_epochs),
                       args.label)
    print(render_table([results]), end="")
    return 0


def _task_epochs(spec: str) -> dict[str, float]:
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--task-epochs {item!r}: expected TASK=EPOCHS, e.g. sst2=1") from None
    return out
