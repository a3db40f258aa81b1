"""Ways to adapt a pretrained model (--method), each deciding what is added and what trains.

full              every weight trains
freeze            embeddings and the bottom K layers are frozen (freeze_layers)
features          the encoder is frozen; a logistic regression is fitted on pooled features
bitfit            only the biases train (Ben Zaken et al., 2021)
lora              LoRA on lora_targets (rank lora_r, scaling lora_alpha / lora_r)
adapter-houlsby   bottleneck adapters (adapter_size) after attention and after the FFN
adapter-pfeiffer  one bottleneck adapter (adapter_size) after the FFN
prefix-embedding  prefix_length trainable virtual tokens at the input
prefix-layer      trainable keys and values of prefix_length virtual tokens in every layer
In every method but `features`, the task head trains too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmforge.errors import ConfigError

METHODS = ("full", "freeze", "features", "bitfit", "lora", "adapter-houlsby", "adapter-pfeiffer",
           "prefix-embedding", "prefix-layer")
ADAPTER = "default"  # the adapter a single-task run trains


@dataclass
class MethodConfig:
    method: str = "full"
    freeze_layers: int = 0
    feature_pooling: str = "mean"      # features: mean | cls
    feature_pairs: str = "separate"    # features on text pairs: separate ([u, v, |u-v|, u*v]) | joint
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: str = "query,value"
    adapter_size: int = 64
    adapter_activation: str = "relu"
    prefix_length: int = 16

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")

    @property
    def saves_whole_model(self) -> bool:
        return self.method in ("full", "freeze")


def head_config(model) -> dict:
    c = model.config
    return {"num_labels": c.num_labels, "id2label": c.id2label, "problem_type": c.problem_type}


def apply_method(model, m: MethodConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    if m.method == "freeze":
        n = model.config.num_layers
        if not 0 <= m.freeze_layers <= n:
            raise ConfigError(f"--freeze-layers {m.freeze_layers} is outside 0..{n} (the model has {n} layers)")
        frozen: list[nn.Module] = [model.transformer.embeddings, *model.transformer.layers[:m.freeze_layers]]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
    elif m.method == "features":
        for p in model.transformer.parameters():
            p.requires_grad_(False)
    elif m.method == "bitfit":
        for name, p in model.transformer.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    elif m.method == "lora":
        from lmforge.adapters.lora import LoraConfig
        from lmforge.adapters.manager import add_adapter, mark_trainable, set_active

        targets = tuple(t.strip() for t in m.lora_targets.split(",") if t.strip())
        add_adapter(model, ADAPTER, LoraConfig(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                                               target_modules=targets), head_config=head_config(model))
        set_active(model, ADAPTER)
        mark_trainable(model, ADAPTER)
    elif m.method.startswith("adapter-"):
        from lmforge.adapters.bottleneck import BottleneckConfig, add_bottleneck

        for p in model.transformer.parameters():
            p.requires_grad_(False)
        add_bottleneck(model, ADAPTER, BottleneckConfig(kind=m.method.removeprefix("adapter-"),
                                                        size=m.adapter_size, activation=m.adapter_activation))
    elif m.method.startswith("prefix-"):
        from lmforge.adapters.prefix import PrefixConfig, add_prefix

        for p in model.transformer.parameters():
            p.requires_grad_(False)
        add_prefix(model, ADAPTER, PrefixConfig(kind=m.method.removeprefix("prefix-"), length=m.prefix_length))


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_parameters(model) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"
