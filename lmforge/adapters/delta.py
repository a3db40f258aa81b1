"""A run that changed only some parameters in place (BitFit's biases, bottleneck adapters, ...)
is saved as those parameters plus what rebuilds the rest: the base model's name and the method.

  delta.json         {"format": "lmforge-delta", "version": 1, "method": {...}, "base_model", "head"}
  delta.safetensors  the trainable tensors under lmforge's parameter names

Saving is atomic; loading checks that the tensors are exactly the ones the method trains.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.adapters.methods import MethodConfig, apply_method, head_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import from_pretrained
from lmforge.utils.atomic import atomic_dir

FORMAT, VERSION = "lmforge-delta", 1


def save_delta(model, directory, method: MethodConfig, base_model: str, tokenizer=None) -> Path:
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    meta = {"format": FORMAT, "version": VERSION, "method": asdict(method), "base_model": base_model,
            "head": {"kind": model.config.head, **head_config(model)}}
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / "delta.safetensors"))
        (tmp / "delta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(directory)


def load_delta(directory, device: str = "cpu"):
    directory = Path(directory)
    meta_file, weights = directory / "delta.json", directory / "delta.safetensors"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{meta_file}: cannot be read ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                          f"supported (expected {FORMAT!r} version {VERSION})")
    head = dict(meta["head"])
    kind = head.pop("kind")
    if head.get("id2label"):
        head["id2label"] = {int(k): v for k, v in head["id2label"].items()}
    model = from_pretrained(meta["base_model"], head=kind, device=device, **head)
    apply_method(model, MethodConfig(**meta["method"]))
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated ({str(e).splitlines()[0]})") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        extra = sorted(set(tensors) ^ set(params))[:3]
        raise CheckpointError(f"{weights}: its tensors do not match what {meta['method']['method']} trains "
                              f"on {meta['base_model']}: {extra}")
    for n, t in tensors.items():
        if t.shape != params[n].shape:
            raise CheckpointError(f"{weights}: tensor {n!r} has shape {list(t.shape)} but the model expects "
                                  f"{list(params[n].shape)}")
        with torch.no_grad():
            params[n].copy_(t)  # not .data: the copy must bump the version the prepacked Linear keys on
    return model.eval()
