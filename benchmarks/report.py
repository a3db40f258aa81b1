"""Write one benchmark's section of BENCHMARKS.md, between markers, leaving the others alone."""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEvery section is written by the script it names, with the exact command; "
          "rerun the command to refresh it (`make bench` runs them all).\n")


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {sys.version.split()[0]}")


def write_section(name: str, command: str, body: str) -> None:
    text = BENCHMARKS.read_text() if BENCHMARKS.is_file() else HEADER
    block = (f"<!-- bench:{name} -->\n## {name}\n\nCommand: `{command}`  \n"
             f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.\n\n{body.rstrip()}\n<!-- /bench:{name} -->\n")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    tmp = BENCHMARKS.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS)
