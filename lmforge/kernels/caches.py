"""Bounds on the per-shape caches of the math libraries under torch.

oneDNN keeps one compiled primitive per GEMM shape (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and ideep, the
layer between torch and oneDNN, one prepared computation per shape with its reordered buffers
(LRU_CACHE_CAPACITY); both default to 1,024 entries. A server sees a new packed token count with
almost every batch, so under bf16 both caches fill with entries nobody asks for again: measured on
MiniLM with mixed-adapter batches (AMD EPYC, bf16), RSS rose from 400 to 1,460 MB before levelling
off with the defaults, and stayed at 440-620 MB with 16-128 entries each, with no loss of speed
(a primitive is rebuilt in well under a millisecond; a 6-layer model uses a few dozen at a time).

Both libraries read their variable once, when they first create a primitive, so this runs when
lmforge.kernels is imported; a value the user set is kept. Importing lmforge after running oneDNN
work in the same process leaves the defaults in force (env() says which values were asked for).
"""

from __future__ import annotations

import os

CAPACITY = 128                     # entries per cache: a few steps' worth of distinct shapes
VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound() -> dict[str, str]:
    """Set each cache's capacity unless the environment already does; the values in force."""
    for name in VARIABLES:
        os.environ.setdefault(name, str(CAPACITY))
    return {name: os.environ[name] for name in VARIABLES}
