"""Evaluate a fine-tuned run on a split: prints one JSON object with every metric of the task.

  lmforge evaluate --run runs/sst2-full --task glue/sst2 --split dev
  lmforge evaluate --task e2e --split dev --predictions outputs.txt
  lmforge evaluate --task e2e --split dev --run runs/e2e-lora --beams 10 --length-penalty 0.8 --no-repeat-ngram 4
  lmforge evaluate --task e2e --split dev --run runs/e2e-lora --no-repeat-ngram-scope output   # as the paper decodes

Data-to-text tasks (e2e, webnlg, dart) score an output file: one output per line, in the order of
the split's unique inputs (lmforge.data.nlg.eval_set), each against all its references, with the
official E2E script's metrics (BLEU, NIST, METEOR, ROUGE_L, CIDEr; needs Java). With --run (a
`finetune --task e2e|webnlg|dart` run) the outputs are generated first, one per unique input
(--max-eval-samples: the first N), and written to --output (default: RUN/predictions-SPLIT.txt).
Their data is read from --data-dir or $LMFORGE_DATA (the folder holding e2e-nlg/, webnlg/, dart/).
"""

from __future__ import annotations

import json

from lmforge.cli.runtime import add_runtime_args, resolve_runtime
from lmforge.cli.validate import positive_int, seq_len
from lmforge.errors import ConfigError


def run_files(run: str):
    """A block with (the run's model directory: its best/, or the directory itself when it is a
    model; a private copy of it for the loaders to read). Every file is opened inside the run
    directory, so a symlink swapped in at open time is refused (utils/confine.py)."""
    from lmforge.utils.confine import private_run_copy
    return private_run_copy(run)


def add_parser(p) -> None:
    from lmforge.cli.finetune import add_data_args, add_decoding_args

    p.add_argument("--run", help="run directory (its best/ model is used) or model directory")
    p.add_argument("--predictions", help="e2e/webnlg/dart: a file of outputs to score, one per line in the "
                                         "order of the split's unique inputs (instead of --run)")
    p.add_argument("--references", choices=["official", "lora"], default="official",
                   help="e2e dev: score against the official CSV's references (default) or the LoRA "
                        "paper's tokenised ones (lora_format/valid.txt)")
    p.add_argument("--split", default="dev", help="dev (dev_matched/dev_mismatched for MNLI) or train")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--max-seq-len", type=seq_len, default=128)
    p.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantization of the base model (CPU)")
    p.add_argument("--output", help="e2e/webnlg/dart with --run: where to write the generated outputs "
                                    "(default: RUN/predictions-SPLIT.txt)")
    add_runtime_args(p)
    add_data_args(p)
    add_decoding_args(p)


def nlg_task(args) -> str | None:
    """The data-to-text task named by --task, or None; checks --run / --predictions go together."""
    from lmforge.data.nlg import TASKS
    task = args.task if args.task in TASKS else None
    if args.run and args.predictions:
        raise ConfigError("--run and --predictions: give one (--predictions scores an existing output file)")
    if args.predictions and task is None:
        raise ConfigError(f"--predictions needs --task {' | '.join(TASKS)}, got {args.task or 'no --task'}")
    if task and not args.predictions and not args.run:
        raise ConfigError(f"--task {task} scores an output file: pass --predictions FILE (one output per unique "
                          "input of the split), or --run DIR to generate them with a trained decoder")
    if not args.run and not args.predictions:
        raise ConfigError("--run is required (or --predictions FILE with --task e2e | webnlg | dart)")
    return task


def read_predictions(path: str, expected: int, what: str) -> list[str]:
    """One output per line; the count must match the unique inputs."""
    from lmforge.data.tables import read_text_file
    text = read_text_file(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":   # the final newline ends the last line, it starts no output
        lines.pop()
    lines = [line.rstrip("\r") for line in lines]
    if len(lines) != expected:
        raise ConfigError(f"{path}: expected {expected} lines (one output per unique input of {what}), got {len(lines)}")
    return lines


def run_nlg(args, task: str) -> int:
    from lmforge.data.nlg import eval_set
    from lmforge.train.nlg_metrics import nlg_scores

    if args.split not in ("dev", "test"):
        raise ConfigError(f"--split for {task} must be dev or test, got {args.split!r}")
    data = eval_set(task, args.split, args.data_dir, references=args.references)
    if args.run:
        return generate_and_score(args, task, data)
    outputs = read_predictions(args.predictions, len(data), f"{task} {args.split}")
    scores = nlg_scores(outputs, data.references)
    print(json.dumps({"task": task, "split": args.split, "inputs": len(data), "references": data.n_references,
                      "reference_set": args.references, **scores}))
    return 0


def generate_and_score(args, task: str, data) -> int:
    """--run with a data-to-text task: the run's decoder generates one output per unique input."""
    from pathlib import Path

    from lmforge.cli.finetune import decoding_from_args
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.train.data_to_text import capped, end_token, evaluate_generation, load_run_model

    decoding = decoding_from_args(args)
    data = capped(data, args.max_eval_samples)
    device, precision = resolve_runtime(args, quiet=True)
    model, adapter, settings = load_run_model(args.run, device)
    if settings["task"] != task:
        raise ConfigError(f"{args.run}: the run was trained on {settings['task']}, not {task}")
    tokenizer = load_tokenizer(settings.get("tokenizer") or settings["model"])   # --arch runs: their --tokenizer
    output = Path(args.output) if args.output else Path(args.run) / f"predictions-{args.split}.txt"
    result = evaluate_generation(model, tokenizer, data, decoding, end_token(tokenizer), output, adapter, precision,
                                 reference_set=args.references)
    print(json.dumps(result))
    return 0


def run(args) -> int:
    task = nlg_task(args)
    if task:
        return run_nlg(args, task)
    from lmforge.infer.classify import Classifier
    from lmforge.train.data import load_eval_split
    from lmforge.train.metrics import compute_metrics

    with run_files(args.run) as (directory, files):
        device, precision = resolve_runtime(args, quiet=True)
        clf = Classifier(files, max_length=args.max_seq_len, quantize=args.quantize, device=device)
        data = load_eval_split(args, args.split, labels=None if clf.regression else clf.labels)
        if data.regression != clf.regression:
            raise ConfigError(f"{directory}: a {'regression' if clf.regression else 'classification'} model "
                              f"cannot be evaluated on {data.name}")
        with precision.autocast(device):
            logits = clf.logits(data.dev)
    preds = logits[:, 0] if clf.regression else logits.argmax(-1)
    metrics = compute_metrics(data.metrics, preds.numpy(), [e.label for e in data.dev])
    print(json.dumps({"task": data.name, "split": args.split, "examples": len(data.dev), **metrics}))
    return 0
