"""Stop strings: where generated text ends (the CLI's `--stop`, the server's `stop`)."""

from __future__ import annotations


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """text up to the first occurrence of any stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)
