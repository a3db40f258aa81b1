"""The user's own labelled data: CSV, TSV or JSONL, with named text / pair / label columns.

A bad row (missing field, empty text, unknown label, a label that is not a number for regression,
a line that is not JSON) stops the run with file:line and the reason, or with skip_bad_rows is
skipped and counted.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import DataError

csv.field_size_limit(sys.maxsize)


@dataclass
class Example:
    text: str
    pair: str | None = None
    label: int | float | None = None   # class index, regression target, or None (unlabelled)
    line: int = 0                      # physical line in the source file (header = line 1)


@dataclass
class BadRows:
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    first_lines: list[int] = field(default_factory=list)

    def add(self, line: int, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] += 1
        if len(self.first_lines) < 5:
            self.first_lines.append(line)

    def __str__(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in self.reasons.most_common())
        return f"{self.skipped} ({why}; first at lines {self.first_lines})"


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 (a leading BOM dropped) -> str; a bad byte is a DataError naming the line and column,
    where Python's own error gives only a byte offset into the whole file."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1  # in bytes, from 1
        raise DataError(f"{name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


def read_text_file(path: str | Path) -> str:
    """A whole input file as text (see decode_text); a missing or unreadable file is a DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    return decode_text(data, str(p))


def _rows(path: Path):
    """(line number, dict) per record; JSONL lines that are not JSON objects come as (line, error)."""
    suffix = path.suffix.lower()
    text = read_text_file(path)
    if not text.strip():
        raise DataError(f"{path}: empty file")
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield n, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            yield n, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
        return
    if suffix not in (".csv", ".tsv"):
        raise DataError(f"{path}: unknown file type {suffix!r} (expected .csv, .tsv or .jsonl)")
    reader = csv.reader(text.splitlines(keepends=True), delimiter="\t" if suffix == ".tsv" else ",")
    header = next(reader, None)
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        line = reader.line_num  # the line where this record ends (quoted fields may span lines)
        if len(row) != len(header):
            yield line, f"{len(row)} fields, the header has {len(header)}"
            continue
        yield line, dict(zip(header, row))


def _check_columns(path: Path, first: dict, wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in first]
    if missing:
        raise DataError(f"{path}: column {missing[0]!r} not found (columns: {', '.join(map(str, first))})")


def load_table(path, text_col: str = "text", label_col: str | None = "label", pair_col: str | None = None,
               label_type: str = "auto", labels: list[str] | None = None, skip_bad_rows: bool = False):
    """-> (examples, labels or None for regression, BadRows report).

    label_type "class": labels are names (sorted, unless `labels` fixes them, e.g. the train set's
    labels for a dev file: then an unknown label is a bad row). "float": regression targets.
    "auto": float when every label parses as a number and one of them is not an integer.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = list(_rows(path))
    good = [(n, r) for n, r in records if isinstance(r, dict)]
    if good:
        _check_columns(path, good[0][1], [c for c in (text_col, pair_col, label_col) if c])
    elif not records:
        raise DataError(f"{path}: no rows after the header")
    if label_col and label_type == "auto":
        label_type = "float" if _all_float([r.get(label_col) for _, r in good]) else "class"
    report = BadRows()
    parsed: list[tuple[int, str, str | None, object]] = []
    for n, r in records:
        try:
            if isinstance(r, str):
                raise ValueError(r)
            parsed.append((n, *_parse(r, text_col, pair_col, label_col, label_type)))
        except ValueError as e:
            if not skip_bad_rows:
                raise DataError(f"{path}:{n}: {e}") from None
            report.add(n, re.sub(r"'[^']*'|\(.*\)|\d+", "_", str(e)).strip())  # a reason, not a value
    if label_col and label_type == "class":
        names = labels if labels is not None else sorted({str(lab) for *_, lab in parsed})
        index = {name: i for i, name in enumerate(names)}
        kept = []
        for n, t, p, lab in parsed:
            if lab not in index:
                if not skip_bad_rows:
                    raise DataError(f"{path}:{n}: label {lab!r} is not one of {names}")
                report.add(n, "unknown label")
                continue
            kept.append((n, t, p, index[lab]))
        parsed, out_labels = kept, names
    else:
        out_labels = None
    if not parsed:
        raise DataError(f"{path}: no usable rows ({report})")
    return [Example(t, p, lab, n) for n, t, p, lab in parsed], out_labels, report


def _all_float(values) -> bool:
    nums = []
    for v in values:
        try:
            nums.append(float(v))
        except (TypeError, ValueError):
            return False
    return bool(nums) and any(not x.is_integer() for x in nums)


def _parse(r: dict, text_col, pair_col, label_col, label_type):
    text = r.get(text_col)
    if text is None:
        raise ValueError(f"missing field {text_col!r}")
    if not str(text).strip():
        raise ValueError(f"empty text in {text_col!r}")
    pair = None
    if pair_col:
        pair = r.get(pair_col)
        if pair is None or not str(pair).strip():
            raise ValueError(f"empty text in {pair_col!r}")
        pair = str(pair)
    label = None
    if label_col:
        raw = r.get(label_col)
        if raw is None or str(raw).strip() == "":
            raise ValueError(f"missing label in {label_col!r}")
        if label_type == "float":
            try:
                label = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"label {raw!r} is not a number") from None
        else:
            label = str(raw).strip()
    return str(text), pair, label
