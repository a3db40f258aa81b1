"""Ways to adapt a pretrained model, chosen with --method. Each decides which parameters train.

full      every weight trains
freeze    embeddings and the bottom K layers are frozen (--freeze-layers K)
features  the encoder is frozen and never run in the trainer: a logistic regression is fitted on
          its pooled features (see train/features.py)
bitfit    only the biases (and the head) train (Ben Zaken et al., 2021)
lora      LoRA adapters (rank --lora-r, scaling --lora-alpha / r) on --lora-targets; the base is
          frozen, the adapter and its own classification head train
"""

from __future__ import annotations

from torch import nn

from lmforge.errors import ConfigError

METHODS = ("full", "freeze", "features", "bitfit", "lora")
ADAPTER = "default"  # the adapter a single-task run trains


def apply_method(model, cfg) -> None:
    """Decide what trains, from the run's FinetuneConfig (method and its size knobs)."""
    method, freeze_layers = cfg.method, cfg.freeze_layers
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
    elif method == "bitfit":
        for name, p in model.transformer.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    elif method == "features":
        for p in model.transformer.parameters():
            p.requires_grad_(False)
    elif method == "lora":
        from lmforge.adapters.lora import LoraConfig
        from lmforge.adapters.manager import add_adapter, mark_trainable, set_active

        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        add_adapter(model, ADAPTER, LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                               target_modules=targets),
                    head_config={"num_labels": model.config.num_labels, "id2label": model.config.id2label,
                                 "problem_type": model.config.problem_type})
        set_active(model, ADAPTER)
        mark_trainable(model, ADAPTER)


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_parameters(model) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"
