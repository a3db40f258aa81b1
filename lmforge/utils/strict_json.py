"""JSON that strict parsers accept: NaN and Infinity are written as null.

Python's json module writes bare `NaN` / `Infinity` by default, which is not JSON (jq, browsers
and most other languages reject the whole file). Every JSON file lmforge writes goes through here.
"""

from __future__ import annotations

import json
import math


def finite(obj):
    """A copy of `obj` with every non-finite float replaced by None (through dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    return json.dumps(finite(obj), allow_nan=False, **kw)


def dump(obj, f, **kw) -> None:
    json.dump(finite(obj), f, allow_nan=False, **kw)
