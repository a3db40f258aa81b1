"""Ways to adapt a pretrained model, chosen with --method. Each decides which parameters train.

full      every weight trains
freeze    embeddings and the bottom K layers are frozen (--freeze-layers K)
features  the encoder is frozen and never run in the trainer: a logistic regression is fitted on
          its pooled features (see train/features.py)
The LoRA-family methods plug in here with the next issue.
"""

from __future__ import annotations

from torch import nn

from lmforge.errors import ConfigError

METHODS = ("full", "freeze", "features")


def apply_method(model, method: str, freeze_layers: int = 0) -> None:
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    for p in model.parameters():
        p.requires_grad_(True)
    if method == "freeze":
        n = model.config.num_layers
        if not 0 <= freeze_layers <= n:
            raise ConfigError(f"--freeze-layers {freeze_layers} is outside 0..{n} (the model has {n} layers)")
        frozen: list[nn.Module] = [model.transformer.embeddings, *model.transformer.layers[:freeze_layers]]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
    elif method == "features":
        for p in model.transformer.parameters():
            p.requires_grad_(False)


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_parameters(model) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"
