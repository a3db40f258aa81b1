"""Cramming on a CPU (issue #14): pre-train for a fixed budget on this machine, fine-tune on SST-2 and
MRPC, and compare with the same architecture fine-tuned from random initialisation; with RoBERTa's
NSP ablation and the Cramming recipe against BERT's at the same token budget.

  python -m benchmarks.cramming                 # 60 minutes of Cramming pre-training, full fine-tuning sets
  python -m benchmarks.cramming --quick         # 10 minutes, 8,000 SST-2 rows (a smoke run; not the target)
  python -m benchmarks.cramming --minutes 30 --size mini
  python -m benchmarks.cramming --jobs 2        # bert and roberta (then the fine-tunes) two at a time,
                                                # each on half the cores
  python -m benchmarks.cramming --corpus gutenberg+imdb --recipes cramming --batch-size 32 --mlm-probability 0.3
                                                # in-domain text for SST-2 (IMDB reviews, text only), the
                                                # cramming recipe alone (no ablation), another batch and mask rate

Recipes (all `lmforge pretrain --size SIZE --max-seq-len 128`, the same WordPiece vocabulary of 8,192
trained here on the corpus, $LMFORGE_DATA/gutenberg; held out: wikitext-2 valid.txt):

  cramming      --arch cramming --objective mlm (fully packed blocks, dynamic masking), one-cycle
                schedule (--schedule linear --warmup 0.5) peaking at 1e-3: the time budget
  bert          --arch bert --objective mlm,nsp --packing segment-pair --masking static, lr 5e-4,
                6% warm-up: as many tokens as the cramming run saw
  roberta       --arch bert --objective mlm --packing full-sentences --masking dynamic, lr 5e-4,
                6% warm-up: the same tokens (the NSP ablation: bert against roberta)
  random        the cramming architecture, never pre-trained

--corpus gutenberg+imdb adds the 25,000 IMDB reviews of aclImdb's train/ and val/ ($LMFORGE_DATA/imdb;
their text only, never their labels; IMDB is another site's reviews than SST-2's Rotten Tomatoes
sentences) to the books, as domain-adaptive pre-training would (Gururangan et al. 2020); the tokenizer
is then trained on both. Such a run lives in its own folder and its own BENCHMARKS.md section.

Each is then fine-tuned on SST-2 and MRPC (`lmforge finetune --method full`, the same recipe for
all); the dev scores are compared. Runs live under runs/bench/cramming/ and a rerun reuses the
finished ones (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import ROOT, trainer_precision, write_section

WORK = ROOT / "runs" / "bench" / "cramming"
RECIPES = {
    "cramming": ["--arch", "cramming", "--objective", "mlm", "--schedule", "linear", "--warmup", "0.5",
                 "--lr", "1e-3"],
    "bert": ["--arch", "bert", "--objective", "mlm,nsp", "--packing", "segment-pair", "--masking", "static",
             "--lr", "5e-4", "--warmup", "0.06"],
    "roberta": ["--arch", "bert", "--objective", "mlm", "--packing", "full-sentences", "--masking", "dynamic",
                "--lr", "5e-4", "--warmup", "0.06"],
}
FINETUNE = ["--method", "full", "--lr", "1e-4", "--batch-size", "32", "--warmup-ratio", "0.06",
            "--max-seq-len", "128", "--no-progress"]
TASKS = {"sst2": ("accuracy", 3), "mrpc": ("accuracy", 5)}   # (metric, epochs)
TARGET = 5.0   # points above random initialisation


def data_root() -> Path:
    for base in (os.environ.get("LMFORGE_DATA"), ROOT.parent / "shared" / "data"):
        if base and (Path(base) / "gutenberg").is_dir():
            return Path(base)
    raise SystemExit("benchmarks.cramming: gutenberg not found (set LMFORGE_DATA)")


def lmforge(*args: str, log: Path) -> None:
    run_all([list(args)], log, jobs=1)


def run_all(commands: list[list[str]], log: Path, jobs: int) -> None:
    """Run lmforge commands, `jobs` at a time; with jobs > 1 each process gets cores // jobs threads
    and its own log (log.N.txt beside log). A failed command stops the benchmark."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    pending, running = list(commands), []

    def start(args, slot):
        out = log if jobs == 1 else log.with_name(f"{log.stem}.{slot}{log.suffix}")
        f = open(out, "a")
        f.write("$ lmforge " + " ".join(args) + "\n")
        f.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", *args], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env)
        running.append((proc, f, args, slot))

    free = list(range(jobs))
    while pending or running:
        while pending and free:
            start(pending.pop(0), free.pop(0))
        # whichever ends first (waiting on one would leave a slot idle while another ends)
        while (done := next((e for e in running if e[0].poll() is not None), None)) is None:
            time.sleep(1)
        proc, f, args, slot = done
        running.remove(done)
        f.close()
        free.append(slot)
        if proc.returncode != 0:
            for other in running:
                other[0].kill()
            raise SystemExit(f"benchmarks.cramming: `lmforge {' '.join(args[:2])} ...` failed (see {log.parent})")


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def imdb_text() -> Path:
    """aclImdb's train/ and val/ reviews as JSONL ({"text": ...}, one review a line; HTML line breaks
    as spaces), written once under WORK; the labels are not read."""
    import tarfile

    out = WORK / "corpus" / "imdb.jsonl"
    if out.is_file():
        return out
    src = data_root() / "imdb" / "aclImdb.tar.gz"
    if not src.is_file():
        raise SystemExit(f"benchmarks.cramming: {src} not found (--corpus gutenberg+imdb reads IMDB's reviews from it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tarfile.open(src) as tar, open(tmp, "w", encoding="utf-8") as f:
        for member in tar:
            parts = member.name.split("/")   # aclImdb/{train,val}/{pos,neg}/ID_RATING.txt
            if member.isfile() and len(parts) == 4 and parts[1] in ("train", "val") and parts[3].endswith(".txt"):
                text = tar.extractfile(member).read().decode("utf-8").replace("<br />", " ")
                f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, out)
    return out


def corpus(name: str) -> list[str]:
    """The pre-training corpus paths of --corpus."""
    paths = [str(data_root() / "gutenberg")]
    return paths + [str(imdb_text())] if name == "gutenberg+imdb" else paths


def tokenizer(log: Path, paths: list[str]) -> Path:
    out = WORK / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        lmforge("tokenizer", "train", "--kind", "wordpiece", "--vocab-size", "8192", "--lowercase",
                "--corpus", *paths, "--out", str(out), log=log)
    return out


def pretrain_command(name: str, size: str, budget: list[str], tok: Path, paths: list[str],
                     recipe: list[str]) -> list[str] | None:
    """The `lmforge pretrain` arguments of a recipe, or None when its run has finished."""
    out = WORK / name
    if (out / "model").is_dir():
        return None
    args = ["pretrain", *RECIPES[name], "--size", size, "--tokenizer", str(tok),
            "--corpus", *paths, "--valid", str(data_root() / "wikitext-2" / "valid.txt"),
            "--max-seq-len", "128", "--eval-batches", "20", "--eval-every", "250", "--no-progress",
            "--out", str(out), *recipe, *budget]
    return args + (["--resume"] if (out / "checkpoint").is_dir() else [])


def pretrained(name: str) -> dict:
    """A finished pre-training run: its model, tokens, speed, held-out accuracies and MLM curve."""
    out = WORK / name
    rows = metrics(out)
    train = [r for r in rows if "loss" in r and "eval" not in r]
    evals = [r for r in rows if "eval" in r]
    return {"dir": out / "model", "tokens": train[-1].get("tokens") if train else None,
            "tokens_per_s": train[-1].get("tokens_per_s") if train else None,
            "mlm_accuracy": evals[-1]["eval"].get("mlm_accuracy") if evals else None,
            "nsp_accuracy": evals[-1]["eval"].get("nsp_accuracy") if evals else None,
            "curve": [(r["step"], r["eval"].get("mlm_accuracy")) for r in evals]}


def random_init(size: str, tok: Path) -> Path:
    """The cramming architecture with random weights and the same tokenizer, saved as a model directory."""
    out = WORK / "random" / "model"
    if not (out / "config.json").is_file():
        import torch

        from lmforge.data.tokenizer import load_tokenizer
        from lmforge.models import Model, save_pretrained
        from lmforge.models.presets import preset

        t = load_tokenizer(tok)
        torch.manual_seed(0)
        model = Model(preset("cramming", size, vocab_size=t.vocab_size, pad_token_id=t.pad_token_id, head="mlm"))
        save_pretrained(model, out, tokenizer=t)
    return out


def finetune_command(model_dir: Path, name: str, task: str, extra: list[str]) -> list[str] | None:
    """The `lmforge finetune` arguments of one (model, task), or None when that run has finished."""
    out = WORK / f"{name}-{task}"
    if (out / "summary.json").is_file():
        return None
    args = ["finetune", "--model", str(model_dir), "--task", f"glue/{task}", "--epochs", str(TASKS[task][1]),
            "--out", str(out), *FINETUNE, *extra]
    return args + (["--resume"] if (out / "checkpoint").is_dir() else [])


def finetuned(name: str, task: str) -> float:
    """The dev score (in points) of a finished fine-tuning run."""
    metric = TASKS[task][0]
    s = json.loads((WORK / f"{name}-{task}" / "summary.json").read_text())
    best = s.get("best_metrics") or s.get("best") or s.get("eval") or {}
    return 100 * float(best.get(metric, best.get(f"eval_{metric}", float("nan"))))


def plot(curves: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        pts = [(s, a) for s, a in curve if a is not None]
        if pts:
            ax.plot([s for s, _ in pts], [100 * a for _, a in pts], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out MLM accuracy (%)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return True


def main(argv=None) -> int:
    global WORK
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 minutes of pre-training and 8,000 SST-2 rows")
    p.add_argument("--minutes", type=float, help="pre-training budget of the cramming run (default 60; 10 quick)")
    p.add_argument("--size", default="mini", choices=["tiny", "mini", "small"])
    p.add_argument("--train-samples", type=int, help="fine-tuning rows per task (default: all; 8,000 quick)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time where they are independent (bert and roberta; the fine-tunes), "
                        "each with cores / jobs threads (default 1)")
    p.add_argument("--corpus", default="gutenberg", choices=["gutenberg", "gutenberg+imdb"],
                   help="pre-training text (default gutenberg; gutenberg+imdb adds IMDB's reviews, text only)")
    p.add_argument("--recipes", default="cramming,bert,roberta",
                   help="comma-separated pre-training recipes (cramming always; bert,roberta: the ablations)")
    p.add_argument("--batch-size", type=int, default=64, help="pre-training batch of 128-token sequences (default 64)")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="masking rate (default BERT's 0.15)")
    p.add_argument("--work", type=Path, help=f"where the runs live (default {WORK.relative_to(ROOT)}, "
                   "or a folder beside it named after the settings that differ from the defaults)")
    args = p.parse_args(argv)
    variant = "".join([f"-{args.corpus}" if args.corpus != "gutenberg" else "",
                       f"-b{args.batch_size}" if args.batch_size != 64 else "",
                       f"-mlm{args.mlm_probability:g}" if args.mlm_probability != 0.15 else ""])
    WORK = args.work or WORK.with_name(WORK.name + variant)
    names = set(args.recipes.split(","))
    if names - {"cramming", "bert", "roberta"}:
        p.error(f"--recipes: expected names among cramming,bert,roberta, got {args.recipes!r}")
    ablations = [n for n in ("bert", "roberta") if n in names]
    recipe = ["--batch-size", str(args.batch_size), "--mlm-probability", str(args.mlm_probability)]
    minutes = args.minutes or (10.0 if args.quick else 60.0)
    samples = args.train_samples or (8000 if args.quick else None)
    extra = ["--max-train-samples", str(samples)] if samples else []
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / "log.txt"
    paths = corpus(args.corpus)
    tok = tokenizer(log, paths)
    # the time budget on the whole machine; then its token count for the other two recipes
    run_all([c for c in [pretrain_command("cramming", args.size, ["--minutes", str(minutes)], tok, paths, recipe)]
             if c], log, 1)
    runs = {"cramming": pretrained("cramming")}
    tokens = runs["cramming"]["tokens"]
    run_all([c for c in (pretrain_command(n, args.size, ["--tokens", str(tokens)], tok, paths, recipe)
                         for n in ablations) if c], log, args.jobs)
    runs |= {name: pretrained(name) for name in ablations}
    dirs = {name: r["dir"] for name, r in runs.items()} | {"random": random_init(args.size, tok)}
    run_all([c for c in (finetune_command(d, name, task, extra) for name, d in dirs.items() for task in TASKS) if c],
            log, args.jobs)
    scores = {name: {task: finetuned(name, task) for task in TASKS} for name in dirs}
    png = WORK.with_name(WORK.name + "-mlm.png")
    drew = plot({n: r["curve"] for n, r in runs.items()}, png)

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"
    text = ("gutenberg (196 books)" if args.corpus == "gutenberg" else
            "gutenberg (196 books) and IMDB's 25,000 train/val reviews (text only)")
    then = f", then its {tokens:,} tokens for {' and '.join(ablations)}" if ablations else " (no ablation runs)"
    lines = [f"Pre-training: {args.size} size, sequences of 128, batch {args.batch_size}, masking rate "
             f"{args.mlm_probability:g}, corpus {text}, WordPiece 8,192 trained on it; held out: wikitext-2 valid. "
             f"Budget: {minutes:g} minutes for cramming{then}.", "",
             "| recipe | tokens | tokens/s | held-out MLM acc. | NSP acc. | SST-2 | MRPC | vs random (SST-2 / MRPC) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = scores["random"]
    for name in ("cramming", *ablations, "random"):
        r = runs.get(name, {})
        d = ("-" if name == "random" else
             f"{scores[name]['sst2'] - base['sst2']:+.1f} / {scores[name]['mrpc'] - base['mrpc']:+.1f}")
        tps = r.get("tokens_per_s")
        lines.append(f"| {name} | {r.get('tokens') or 0:,} | {tps or 0:,.0f} | {pct(r.get('mlm_accuracy'))} | "
                     f"{pct(r.get('nsp_accuracy'))} | {scores[name]['sst2']:.1f} | {scores[name]['mrpc']:.1f} | {d} |")
    met = all(scores["cramming"][t] - base[t] >= TARGET for t in TASKS)
    verdicts = f"Target (cramming at least {TARGET:g} points above random initialisation on both tasks): " \
               f"**{'met' if met else 'missed'}**."
    if len(ablations) == 2:
        nsp_winner = max(("bert", "roberta"), key=lambda n: scores[n]["sst2"] + scores[n]["mrpc"])
        recipe_winner = max(("cramming", "bert"), key=lambda n: scores[n]["sst2"] + scores[n]["mrpc"])
        verdicts += (f" NSP ablation (bert: mlm,nsp with segment pairs; roberta: mlm with full sentences and dynamic "
                     f"masking; same tokens): **{nsp_winner}** scores higher (SST-2 + MRPC). Recipe: "
                     f"**{recipe_winner}** scores higher of cramming and bert at the same tokens.")
    lines += ["", verdicts,
              "", f"Fine-tuning: `lmforge finetune --model DIR --task glue/TASK {' '.join(FINETUNE + extra)}` with "
              f"{', '.join(f'{t} {e} epochs' for t, (_, e) in TASKS.items())}; dev {', '.join(m for m, _ in TASKS.values())}."]
    if drew:
        shown = png.relative_to(ROOT) if png.is_relative_to(ROOT) else png   # --work elsewhere
        lines.append(f"MLM accuracy curves: `{shown}`.")
    if args.size == "mini":
        lines += ["", "For orientation, the ceiling at this size: Google's BERT-Mini (the same 4 layers x 256, pre-trained "
                  "in full on BookCorpus and Wikipedia; Turc et al. 2019, the BERT miniatures' model card) scores "
                  "SST-2 85.9 and MRPC 71.8 accuracy (81.1 F1) on the GLUE test sets (the scores above are dev scores), "
                  "with the best of a grid of fine-tuning settings: 5 points above a random-initialisation MRPC "
                  "score near 70 is near or beyond what full pre-training gives a model of this size."]
    body = "\n".join(lines)
    print(body)
    cmd = "python -m benchmarks.cramming" + (" --quick" if args.quick else "") + (
        f" --minutes {args.minutes:g}" if args.minutes else "") + (f" --size {args.size}" if args.size != "mini" else "") + (
        f" --jobs {args.jobs}" if args.jobs != 1 else "") + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v, d in [("corpus", args.corpus, "gutenberg"),
                                                          ("recipes", args.recipes, "cramming,bert,roberta"),
                                                          ("batch_size", args.batch_size, 64),
                                                          ("mlm_probability", args.mlm_probability, 0.15)] if v != d)
    title = "Cramming on a CPU" + ("" if args.corpus == "gutenberg" else " (Gutenberg + IMDB)")
    write_section(title + (" (quick)" if args.quick else ""), cmd, body,
                  precision=trainer_precision("auto"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
