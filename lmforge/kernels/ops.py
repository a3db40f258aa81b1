"""Private torch ops, looked up once and guarded: a torch build without one gives None, and the
kernel that needs it falls back to plain PyTorch instead of failing."""

from __future__ import annotations

import torch


def private_op(namespace: str, name: str):
    """torch.ops.NAMESPACE.NAME, or None where this torch has no such op."""
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None
