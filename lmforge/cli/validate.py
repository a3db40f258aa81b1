"""argparse `type=` functions: a bad option value makes argparse itself exit 2 with one line,
`lmforge finetune: error: --batch-size must be >= 1, got 0`, before any file is touched.

The ranges are lmforge.utils.checks's (the same ones the config dataclasses check for the Python
API); `field_type(Config, "name")` reads a field's rule so each rule is written down once.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

from lmforge.utils import checks


class Parser(argparse.ArgumentParser):
    """Errors on one line, `lmforge CMD: error: --opt why` (argparse prints its usage first, a dozen
    lines for finetune, and says `argument --opt: why`)."""

    def error(self, message: str):
        message = re.sub(r"^argument (\S+): ", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def ranged(base: type, r: checks.Range):
    """A `type=` that parses with `base` (int or float) and checks the range."""
    def parse(text: str):
        try:
            value = base(text)
        except ValueError:
            kind = "an integer" if base is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        why = r.problem(value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value
    parse.__name__ = f"{base.__name__} in range"
    return parse


def field_type(config_cls, name: str, base: type | None = None):
    """The `type=` of the option for `config_cls.name`, from the field's rule."""
    f = next(f for f in fields(config_cls) if f.name == name)
    base = base or (float if "float" in str(f.type) else int)
    return ranged(base, f.metadata["range"])


positive_int = ranged(int, checks.AT_LEAST_1)
non_negative_int = ranged(int, checks.NON_NEGATIVE)
non_negative_float = ranged(float, checks.NON_NEGATIVE)
seq_len = ranged(int, checks.SEQ_LEN)
port = ranged(int, checks.PORT)


def writable_dir(text: str) -> str:
    """--out DIR: it, or the nearest ancestor it would be created in, is writable (nothing is created)."""
    why = checks.writable_dir_problem(text)
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def writable_file(text: str) -> str:
    why = checks.writable_file_problem(text)
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def int_list(text: str) -> list[int]:
    """--seeds 1,2,3: non-negative integers."""
    parse = ranged(int, checks.SEED)
    values = [parse(s.strip()) for s in text.split(",") if s.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}")
    return values
