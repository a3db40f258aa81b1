"""Predict labels (with probabilities) or scores for a file of texts with a fine-tuned run.

  lmforge predict --run runs/sst2-full --input texts.jsonl [--output preds.jsonl]

Input: JSONL with a "text" field (and "text_pair" for pair tasks; names set by --text-col and
--text-pair-col), CSV/TSV with those columns, or plain text with one input per line.
Output: one JSON object per input, in order: {"label", "probabilities": {...}} or {"score"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.cli.runtime import add_runtime_args, resolve_runtime
from lmforge.cli.validate import seq_len, writable_file
from lmforge.errors import DataError
from lmforge.utils.atomic import atomic_file


def add_parser(p) -> None:
    p.add_argument("--run", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", type=writable_file, help="write here (atomically) instead of standard output")
    p.add_argument("--text-col", default="text")
    p.add_argument("--text-pair-col", dest="pair_col")
    p.add_argument("--max-seq-len", type=seq_len, default=128)
    p.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantization of the base model (CPU)")
    add_runtime_args(p)


def read_inputs(path: str, text_col: str, pair_col: str | None):
    from lmforge.data.tables import load_table

    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        examples, _, _ = load_table(p, text_col=text_col, pair_col=pair_col, label_col=None)
        return examples
    from lmforge.data.tables import Example, read_text_file

    return [Example(text=t, pair=None, label=None, line=i + 1)
            for i, t in enumerate(read_text_file(p).splitlines())]


def run(args) -> int:
    from lmforge.cli.evaluate import run_files
    from lmforge.infer.classify import Classifier

    examples = read_inputs(args.input, args.text_col, args.pair_col)
    if not examples:
        raise DataError(f"{args.input}: empty input")
    with run_files(args.run) as (_, files):
        device, precision = resolve_runtime(args, quiet=True)
        clf = Classifier(files, max_length=args.max_seq_len, quantize=args.quantize, device=device)
        with precision.autocast(device):
            lines = [json.dumps(r) + "\n" for r in clf.predict(examples)]
    if args.output:
        with atomic_file(args.output, "w") as f:
            f.writelines(lines)
    else:
        sys.stdout.writelines(lines)
    return 0
