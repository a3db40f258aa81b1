"""The GLUE tasks: columns, label sets, official metrics, and readers for the GLUE download layout
(or, for users with internet, the Hugging Face `datasets` hub)."""

from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.tables import Example, read_text_file
from lmforge.errors import ConfigError, DataError

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str
    text_col: str | int                 # header name, or column index for header-less files
    pair_col: str | int | None
    label_col: str | int
    labels: list[str] | None            # None = regression (STS-B)
    metrics: tuple[str, ...]
    main_metric: str
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "dev": "dev.tsv"})
    header: bool = True
    hf_config: str = ""                 # the `datasets` config name of glue
    file_labels: tuple[str, ...] = ("0", "1")  # how labels[i] is written in the files, when they differ

    @property
    def regression(self) -> bool:
        return self.labels is None


_NLI = ["entailment", "not_entailment"]
_SAME = ()  # the files spell the label names themselves
TASKS = {t.name: t for t in [
    GlueTask("cola", "CoLA", 3, None, 1, ["unacceptable", "acceptable"], ("mcc",), "mcc", header=False, hf_config="cola"),
    GlueTask("sst2", "SST-2", "sentence", None, "label", ["negative", "positive"], ("accuracy",), "accuracy", hf_config="sst2"),
    GlueTask("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ["not_equivalent", "equivalent"], ("accuracy", "f1"), "accuracy",
             hf_config="mrpc"),
    GlueTask("stsb", "STS-B", "sentence1", "sentence2", "score", None, ("pearson", "spearman"), "pearson",
             hf_config="stsb"),
    GlueTask("qqp", "QQP", "question1", "question2", "is_duplicate", ["not_duplicate", "duplicate"], ("accuracy", "f1"), "accuracy",
             hf_config="qqp"),
    GlueTask("mnli", "MNLI", "sentence1", "sentence2", "gold_label", ["contradiction", "entailment", "neutral"],
             ("accuracy",), "accuracy", hf_config="mnli", file_labels=_SAME,
             splits={"train": "train.tsv", "dev": "dev_matched.tsv", "dev_matched": "dev_matched.tsv",
                     "dev_mismatched": "dev_mismatched.tsv"}),
    GlueTask("qnli", "QNLI", "question", "sentence", "label", _NLI, ("accuracy",), "accuracy", hf_config="qnli",
             file_labels=_SAME),
    GlueTask("rte", "RTE", "sentence1", "sentence2", "label", _NLI, ("accuracy",), "accuracy", hf_config="rte",
             file_labels=_SAME),
    GlueTask("wnli", "WNLI", "sentence1", "sentence2", "label", ["not_entailment", "entailment"],
             ("accuracy",), "accuracy", hf_config="wnli"),
]}


def get_task(name: str) -> GlueTask:
    key = name.lower().removeprefix("glue/").replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ConfigError(f"unknown GLUE task {name!r} (known: {', '.join('glue/' + t for t in TASKS)})")
    return TASKS[key]


def default_data_dir() -> Path | None:
    root = os.environ.get("LMFORGE_DATA")
    return Path(root) / "glue" if root else None


def _read_tsv(path: Path, header: bool) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    # GLUE TSVs are unquoted: a '"' is text, not a quote (QUOTE_NONE); MRPC has a BOM (read_text_file
    # drops it). StringIO(newline="") splits lines as open(newline="") would.
    text = read_text_file(path)
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    numbered = [(i + 1, r) for i, r in enumerate(rows) if r]
    if header:
        return numbered[0][1], numbered[1:]
    return None, numbered


def _column(header: list[str] | None, col, path: Path) -> int:
    if isinstance(col, int):
        return col
    if col not in header:
        raise DataError(f"{path}:1: column {col!r} not in header {header}")
    return header.index(col)


def _mrpc_train(folder: Path) -> tuple[Path, list[tuple[int, list[str]]], list[str]]:
    """The official 3,668 MRPC training pairs: the MSR training file minus the dev pair ids."""
    source = folder / "msr_paraphrase_train.txt"
    dev_ids = folder / "dev_ids.tsv"
    for f in (source, dev_ids):
        if not f.is_file():
            raise DataError(f"{f}: missing (needed to rebuild MRPC train)")
    _, ids = _read_tsv(dev_ids, header=False)
    held_out = {(r[0], r[1]) for _, r in ids}
    header, rows = _read_tsv(source, header=True)
    return source, [(n, r) for n, r in rows if (r[1], r[2]) not in held_out], header


def load_split(task: GlueTask | str, split: str = "train", data_dir: str | Path | None = None) -> list[Example]:
    """The examples of one split, from a GLUE-layout folder, else from the `datasets` hub."""
    task = get_task(task) if isinstance(task, str) else task
    if split not in task.splits and split != "test":
        raise ConfigError(f"glue/{task.name} has no split {split!r} (splits: {', '.join(task.splits)}, test)")
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is None or not root.is_dir():
        return load_from_hub(task, split)
    folder = root / task.folder
    if task.name == "mrpc" and split == "train":
        path, rows, header = _mrpc_train(folder)
    else:
        path = folder / task.splits.get(split, "test.tsv")
        if not path.is_file():
            raise DataError(f"{path}: missing; put the GLUE file there, or install `datasets` and pass "
                            "no --data-dir (nor LMFORGE_DATA) to read it from the hub")
        header, rows = _read_tsv(path, task.header)
    text_i = _column(header, task.text_col, path)
    pair_i = _column(header, task.pair_col, path) if task.pair_col is not None else None
    try:
        label_i = _column(header, task.label_col, path)
    except DataError:
        if split != "test":
            raise
        label_i = None  # test files carry no labels
    spelled = list(task.file_labels or task.labels or [])
    examples = []
    for line, r in rows:
        need = max(i for i in (text_i, pair_i, label_i) if i is not None)
        if len(r) <= need:
            raise DataError(f"{path}:{line}: {len(r)} columns, expected at least {need + 1}")
        label = None
        if label_i is not None and split != "test":
            raw = r[label_i].strip()
            if task.regression:
                try:
                    label = float(raw)
                except ValueError:
                    raise DataError(f"{path}:{line}: score {raw!r} is not a number") from None
            elif raw in spelled:
                label = spelled.index(raw)
            else:
                raise DataError(f"{path}:{line}: label {raw!r} is not one of {spelled}")
        examples.append(Example(r[text_i], r[pair_i] if pair_i is not None else None, label, line))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def load_from_hub(task: GlueTask, split: str) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"glue/{task.name}: no local data (set LMFORGE_DATA or --data-dir to a GLUE folder) "
                        "and the `datasets` package is not installed to fetch it from the hub") from None
    hf_split = {"dev": "validation_matched" if task.name == "mnli" else "validation",
                "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}.get(split, split)
    ds = datasets.load_dataset("glue", task.hf_config, split=hf_split)
    cols = {"sst2": ("sentence", None), "cola": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
            "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
            "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
            "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}[task.name]
    # The hub's label ids follow its own names; map through the names to ours.
    names = ds.features["label"].names if hasattr(ds.features["label"], "names") else None
    out = []
    for i, row in enumerate(ds):
        label = row["label"]
        if label is None or label == -1:
            label = None
        elif task.regression:
            label = float(label)
        elif names and names[label] in task.labels:
            label = task.labels.index(names[label])
        else:
            label = int(label)
        out.append(Example(row[cols[0]], row[cols[1]] if cols[1] else None, label, i + 1))
    return out
