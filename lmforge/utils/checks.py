"""The value rules every setting is checked against, defined once.

A config dataclass attaches a rule to a field (`field(default=..., metadata=rule(AT_LEAST_1))`);
`check_fields(config)` applies them for the Python API, and the CLI turns the same rule into an
argparse `type=` (lmforge/cli/validate.py), so a bad option is refused before anything is written
and the two can never disagree.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False      # lo itself is not allowed (learning rates: > 0)
    hi_open: bool = False      # hi itself is not allowed (dropout: < 1)

    def problem(self, value) -> str | None:
        """Why `value` is out of range, or None when it is fine."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}, got {value}"
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return f"must be {'<' if self.hi_open else '<='} {_num(self.hi)}, got {value}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


AT_LEAST_1 = Range(lo=1)                  # sizes and counts where zero means nothing would happen
NON_NEGATIVE = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)      # learning rates, epochs
UNIT_INTERVAL = Range(lo=0, hi=1)         # ratios
DROPOUT = Range(lo=0, hi=1, hi_open=True)  # p = 1 would zero every activation
SEED = Range(lo=0, hi=2**32 - 1)          # what NumPy's seeding accepts
PORT = Range(lo=0, hi=65535)              # 0: the OS picks a free port
# Room for a pair's three special tokens ([CLS] a [SEP] b [SEP]) and a token of text: below the
# special-token count the tokenizers library silently does not truncate at all.
SEQ_LEN = Range(lo=4)


def rule(r: Range, option: str | None = None) -> dict:
    """Field metadata: the field's range and its CLI spelling (default --field-name)."""
    return {"range": r, "option": option}


def option_name(f) -> str:
    return f.metadata.get("option") or "--" + f.name.replace("_", "-")


def check_fields(config) -> None:
    """Raise ConfigError naming the first field (by its CLI option) whose value breaks its rule."""
    for f in fields(config):
        r = f.metadata.get("range")
        value = getattr(config, f.name)
        if r is None or value is None or isinstance(value, bool):
            continue
        why = r.problem(value)
        if why:
            raise ConfigError(f"{option_name(f)} {why}")


def writable_dir_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot become (or be written in as) a directory, without creating anything.

    The nearest existing ancestor must be a directory we may write and enter; an existing `path`
    must itself be a writable directory. os.access also reports read-only file systems (EROFS)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return f"{p}: exists and is not a directory"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"{p}: not writable (permission denied or read-only file system)"
        return None
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent}: is not a directory, so {p} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{p}: cannot be created, {parent} is not writable (permission denied or read-only file system)"
    return None


def writable_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written (atomically, beside itself) at `path`, without creating anything."""
    p = Path(path)
    if p.is_dir():
        return f"{p}: is a directory"
    return writable_dir_problem(p.absolute().parent)


def check_writable_dir(path, option: str) -> None:
    why = writable_dir_problem(path)
    if why:
        raise ConfigError(f"{option} {why}")
