"""GLUE with all-MiniLM-L6-v2: one Table-2-style row per adaptation method, median over seeds.

  python -m benchmarks.glue --methods full,features --tasks cola,sst2,mrpc,stsb,rte --seeds 1,2,3
  python -m benchmarks.glue --quick     # 2 tasks, 1 seed, 2000 training rows: a few minutes

Each (method, task, seed) is an ordinary `lmforge glue` run under runs/bench/glue-METHOD, so an
interrupted benchmark resumes where it stopped. By default seeds are the outer loop: after the first
seed every method has a whole row, and the BENCHMARKS.md section is rewritten after each seed.
`--order methods` finishes the methods listed first before starting the next ones.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from benchmarks.report import ROOT, cached_kernels, trainer_precision, write_section

# One recipe per method for every task (the LoRA paper tunes per task; this is the cheap, honest
# default): 3 epochs, except SST-2 (67k rows) which gets 1 (TASK_EPOCHS).
TASK_EPOCHS = "sst2=1"
RECIPES = {
    "full": ["--lr", "1e-4", "--epochs", "3", "--batch-size", "32", "--warmup-ratio", "0.06"],
    "freeze": ["--lr", "1e-4", "--epochs", "3", "--batch-size", "32", "--freeze-layers", "3"],
    "features": [],
    "lora": ["--lr", "1e-3", "--epochs", "3", "--batch-size", "32", "--lora-r", "8", "--lora-alpha", "16"],
    "bitfit": ["--lr", "1e-3", "--epochs", "3", "--batch-size", "32"],
    "adapter-houlsby": ["--lr", "1e-3", "--epochs", "3", "--batch-size", "32", "--adapter-size", "16"],
    "adapter-pfeiffer": ["--lr", "1e-3", "--epochs", "3", "--batch-size", "32", "--adapter-size", "16"],
    "prefix-layer": ["--lr", "3e-3", "--epochs", "3", "--batch-size", "32", "--prefix-length", "16"],
    # LoRA converges more slowly per step than full fine-tuning (the paper trains it 30-80 epochs), and
    # each step costs less than half as much: this row gives it about full fine-tuning's wall time.
    "lora-long": ["--method", "lora", "--label", "minilm (lora, 10 epochs)", "--lr", "1e-3", "--epochs", "10",
                  "--batch-size", "32", "--lora-r", "8", "--lora-alpha", "16"],
}
# Rows of the table in this order, whatever order --methods ran them in (the paper's: full fine-tuning
# first, then the parameter-efficient methods, then the cheap baseline).
TABLE_ORDER = ["full", "freeze", "lora", "lora-long", "bitfit", "adapter-houlsby", "adapter-pfeiffer", "prefix-layer",
               "prefix-embedding", "features"]


def _table_rank(method: str) -> int:
    return TABLE_ORDER.index(method) if method in TABLE_ORDER else len(TABLE_ORDER)


# The SST-2 epochs of the recipes above, which otherwise use TASK_EPOCHS.
SST2_EPOCHS = {"lora-long": "sst2=2"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,features")
    p.add_argument("--tasks", default="cola,sst2,mrpc,stsb,rte")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--model", default="minilm")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", help="override every recipe's epochs (e.g. 1 for a cheaper table)")
    p.add_argument("--name", default="GLUE", help="the BENCHMARKS.md section to write")
    p.add_argument("--order", choices=["seeds", "methods"], default="seeds",
                   help="outer loop: 'seeds' gives every method a row early; 'methods' finishes each "
                        "method's seeds before starting the next (so the first methods listed finish first)")
    args = p.parse_args(argv)
    extra = ["--epochs", args.epochs] if args.epochs else []
    if args.quick:
        args.tasks, args.seeds, extra = "sst2,rte", "1", ["--max-train-samples", "2000", "--epochs", "1"]
    tag = f"{'-quick' if args.quick else ''}{'-e' + args.epochs if args.epochs else ''}"
    methods = args.methods.split(",")
    seeds = args.seeds.split(",")
    def task_epochs(method: str) -> list[str]:
        return [] if args.epochs or args.quick else ["--task-epochs", SST2_EPOCHS.get(method, TASK_EPOCHS)]

    command = "python -m benchmarks.glue " + " ".join(argv if argv is not None else sys.argv[1:])
    recipe = "\n".join(f"- `{m}`: `{' '.join(RECIPES[m] + extra + task_epochs(m))}`" if RECIPES.get(m)
                       else f"- `{m}`: (defaults)" for m in sorted(methods, key=_table_rank))
    out_dirs = [ROOT / "runs" / "bench" / f"glue-{m}{tag}" for m in methods]
    # (seed count, method index) in the order asked for; each lmforge glue call resumes finished runs.
    jobs = ([(n, i) for n in range(1, len(seeds) + 1) for i in range(len(methods))] if args.order == "seeds"
            else [(n, i) for i in range(len(methods)) for n in range(1, len(seeds) + 1)])
    for n, i in jobs:
        method = methods[i]
        cmd = [sys.executable, "-m", "lmforge", "glue", "--model", args.model, "--method", method,
               "--tasks", args.tasks, "--seeds", ",".join(seeds[:n]), "--out", str(out_dirs[i]), "--no-progress",
               *RECIPES.get(method, []), *extra, *task_epochs(method)]
        subprocess.run(cmd, check=True)
        if args.order == "seeds" and i < len(methods) - 1:
            continue  # write the table once per seed round
        done = [str(d) for m, d in sorted(zip(methods, out_dirs), key=lambda md: _table_rank(md[0]))
                if (d / "results.json").exists()]
        table = subprocess.run([sys.executable, "-m", "lmforge", "glue", "--merge", *done],
                               check=True, capture_output=True, text=True).stdout
        write_section(args.name + (" (quick)" if args.quick else ""), command.strip(),
                      f"{table}\nRecipes (one per method for every task; `--task-epochs` sets SST-2's):\n{recipe}\n",
                      precision=trainer_precision("auto"), kernels=cached_kernels())
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
