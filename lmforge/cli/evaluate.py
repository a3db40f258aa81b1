"""Evaluate a fine-tuned run on a split: prints one JSON object with every metric of the task.

  lmforge evaluate --run runs/sst2-full --task glue/sst2 --split dev
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
    from lmforge.cli.finetune import add_data_args

    p.add_argument("--run", required=True, help="run directory (its best/ model is used) or model directory")
    p.add_argument("--split", default="dev", help="dev (dev_matched/dev_mismatched for MNLI) or train")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--max-seq-len", type=seq_len, default=128)
    p.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantization of the base model (CPU)")
    add_runtime_args(p)
    add_data_args(p)


def run(args) -> int:
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
