"""Ways to adapt a pretrained model (--method), each deciding what is added and what trains.

full              every weight trains
freeze            embeddings and the bottom K layers are frozen (freeze_layers)
features          the encoder is frozen; a logistic regression is fitted on pooled features
bitfit            only the biases train (Ben Zaken et al., 2021)
lora              LoRA on lora_targets (rank lora_r, scaling lora_alpha / lora_r)
adapter-houlsby   bottleneck adapters (adapter_size) after attention and after the FFN
adapter-pfeiffer  one bottleneck adapter (adapter_size) after the FFN
adapter-l         the LoRA paper's AdapterL (Lin et al., 2020): one adapter after the FFN, with a
                  LayerNorm of its own on its input
prefix-embedding  prefix_length trainable virtual tokens at the input
prefix-layer      trainable keys and values of prefix_length virtual tokens in every layer
In every method but `features`, the task head trains too. A language-model head (causal-lm, mlm) is
not a task head: it is the model's own output layer, so only full and freeze train it, and LoRA gives
its adapter no copy of it (an untied LM head is a vocabulary-sized matrix).

Each family is one `Method` object in REGISTRY (attach, save, load, export, the adapter its runs
route to, whether it mixes in a batch, whether the server can hot-load it): callers dispatch through
get_method() / method_of_dir() / load_run(). What trains is what attach() leaves requires_grad=True:
the optimizer, save_delta and the parameter counts all read that one mark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lmforge.errors import ConfigError

METHODS = ("full", "freeze", "features", "bitfit", "lora", "adapter-houlsby", "adapter-pfeiffer", "adapter-l",
           "prefix-embedding", "prefix-layer")
LM_HEADS = ("causal-lm", "mlm")   # heads that are the model's output layer, not a task's
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


class Method:
    """One adaptation method family. Every consumer (training, evaluate/predict, export, the server)
    dispatches through these methods instead of testing --method names:

    attach(model, m)      add what the method adds and mark what trains (requires_grad)
    save(model, dir, m, base_model, tokenizer)   what the run keeps in best/
    load(dir, device)     (model, adapter) from such a directory: the model and the adapter name a
                          forward pass must route to (None: the model itself is adapted)
    export(model, adapter) a plain model (no adapter modules), or ConfigError saying why not
    adapter               the adapter name a model adapted by attach() runs with (routing), or None
    trains_model          False when something else trains (features: a probe on frozen features)
    mixable               whether rows routed to its adapters share one forward pass with rows of other
                          adapters and of the base model (a mixed-adapter batch; else such a routing
                          is a ConfigError from the forward pass)
    servable              whether `lmforge serve` hot-loads its runs onto the base it serves (PEFT format)
    mergeable             whether export folds it into the base weights (LoRA)
    """
    names: tuple[str, ...] = ()
    adapter: str | None = None
    trains_model = True
    mixable = False
    servable = False
    mergeable = False

    def attach(self, model, m: MethodConfig) -> None:
        raise NotImplementedError

    def save(self, model, directory, m: MethodConfig, base_model: str, tokenizer=None) -> Path:
        from lmforge.adapters.delta import save_delta
        return save_delta(model, directory, m, base_model, tokenizer)

    def load(self, directory: Path, device: str = "cpu"):
        from lmforge.adapters.delta import load_delta
        return load_delta(directory, device), self.adapter

    def export(self, model, adapter: str | None = None):
        return model

    @staticmethod
    def _freeze_trunk(model) -> None:
        for p in model.transformer.parameters():
            p.requires_grad_(False)


class WholeModel(Method):
    """full (every weight) and freeze (embeddings and the bottom K layers frozen): saved whole."""
    names = ("full", "freeze")

    def attach(self, model, m: MethodConfig) -> None:
        if m.method != "freeze":
            return
        n = model.config.num_layers
        if not 0 <= m.freeze_layers <= n:
            raise ConfigError(f"--freeze-layers {m.freeze_layers} is outside 0..{n} (the model has {n} layers)")
        frozen: list[nn.Module] = [model.transformer.embeddings, *model.transformer.layers[:m.freeze_layers]]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def save(self, model, directory, m, base_model, tokenizer=None) -> Path:
        from lmforge.models import save_pretrained
        save_pretrained(model, directory, tokenizer=tokenizer)
        return Path(directory)

    def load(self, directory: Path, device: str = "cpu"):
        from lmforge.models import from_pretrained
        return from_pretrained(directory, device=device).eval(), None


class Features(WholeModel):
    """features: the encoder frozen; a linear probe (train/features.py) is what trains, and is
    saved with the encoder (probe.json + probe.safetensors beside config.json)."""
    names = ("features",)
    trains_model = False

    def attach(self, model, m: MethodConfig) -> None:
        self._freeze_trunk(model)

    def save(self, model, directory, m, base_model, tokenizer=None) -> Path:
        raise ConfigError("a features run is saved by its probe fit (train/features.py)")


class BitFit(Method):
    """bitfit: only the biases train; saved as a delta, exported as a plain model."""
    names = ("bitfit",)

    def attach(self, model, m: MethodConfig) -> None:
        for name, p in model.transformer.named_parameters():
            p.requires_grad_(name.endswith("bias"))


class Bottleneck(Method):
    """adapter-houlsby / adapter-pfeiffer: bottleneck adapters named ADAPTER in every layer; runs route
    to ADAPTER, and rows of different bottleneck (or LoRA) adapters mix in one batch (each row's tokens
    through its own adapter). Saved as a delta, which the server does not hot-load."""
    names = ("adapter-houlsby", "adapter-pfeiffer", "adapter-l")
    adapter = ADAPTER
    mixable = True
    KINDS = {"adapter-houlsby": "houlsby", "adapter-pfeiffer": "pfeiffer", "adapter-l": "lin"}

    def attach(self, model, m: MethodConfig) -> None:
        from lmforge.adapters.bottleneck import BottleneckConfig, add_bottleneck
        self._freeze_trunk(model)
        add_bottleneck(model, ADAPTER, BottleneckConfig(kind=self.KINDS[m.method],
                                                        size=m.adapter_size, activation=m.adapter_activation))

    def export(self, model, adapter=None):
        raise ConfigError("bottleneck adapters add layers a plain model does not have; export supports "
                          "full, freeze, bitfit and (with --merged) lora runs")


class Prefix(Method):
    """prefix-embedding / prefix-layer: trainable virtual tokens, or keys and values in every layer,
    named ADAPTER; runs route to ADAPTER. Not mixable: a prefix changes the sequence (or the keys) of
    the rows that use it, so its rows cannot share a forward pass with rows that do not."""
    names = ("prefix-embedding", "prefix-layer")
    adapter = ADAPTER

    def attach(self, model, m: MethodConfig) -> None:
        from lmforge.adapters.prefix import PrefixConfig, add_prefix
        self._freeze_trunk(model)
        add_prefix(model, ADAPTER, PrefixConfig(kind=m.method.removeprefix("prefix-"), length=m.prefix_length))

    def export(self, model, adapter=None):
        raise ConfigError("prefix tuning adds virtual tokens a plain model does not have; export supports "
                          "full, freeze, bitfit and (with --merged) lora runs")


class Lora(Method):
    """lora: an adapter named ADAPTER with its own head, in PEFT's format; runs routed to ADAPTER,
    mixes with other LoRA adapters in one batch, and merges into the weights on export."""
    names = ("lora",)
    adapter = ADAPTER
    mixable = True
    servable = True
    mergeable = True

    def attach(self, model, m: MethodConfig) -> None:
        from lmforge.adapters.lora import LoraConfig
        from lmforge.adapters.manager import add_adapter, mark_trainable

        targets = tuple(t.strip() for t in m.lora_targets.split(",") if t.strip())
        lm = model.config.head in LM_HEADS   # the adapter answers through the model's own LM head
        add_adapter(model, ADAPTER, LoraConfig(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                                               target_modules=targets), head=not lm,
                    head_config=None if lm else head_config(model))
        mark_trainable(model, ADAPTER)

    # PEFT has no key map for GPT-2's fused c_attn here (peft_format): its LoRA runs save as a delta
    NO_PEFT = ("gpt2",)

    def save(self, model, directory, m, base_model, tokenizer=None) -> Path:
        from lmforge.adapters.peft_format import save_adapter
        if model.config.model_type in self.NO_PEFT:
            return super().save(model, directory, m, base_model, tokenizer)
        return save_adapter(model, ADAPTER, directory, base_model=base_model, tokenizer=tokenizer)

    def load(self, directory: Path, device: str = "cpu", name: str = ADAPTER):
        from lmforge.adapters.peft_format import load_adapter, read_adapter_config
        from lmforge.models import from_pretrained

        if (Path(directory) / "delta.json").is_file() and not (Path(directory) / "adapter_config.json").is_file():
            return super().load(directory, device)   # a LoRA run saved as a delta (GPT-2)
        directory = Path(directory).resolve()   # files are read confined to it (peft_format)
        base = read_adapter_config(directory).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{directory / 'adapter_config.json'}: no base_model_name_or_path to load the "
                              "adapter onto")
        model = from_pretrained(base, head=self._head_kind(directory), device=device).eval()
        load_adapter(model, directory, name)
        return model.eval(), name

    @staticmethod
    def _head_kind(directory: Path) -> str:
        """The head the adapter was trained on (lmforge_head.json); classification when not said."""
        if not (directory / "lmforge_head.json").is_file():
            return "classification"
        from lmforge.utils.confine import Confined
        try:
            kind = Confined(directory).read_json(directory / "lmforge_head.json").get("head")
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{directory / 'lmforge_head.json'}: cannot be read ({e})") from None
        return kind if isinstance(kind, str) and kind else "classification"

    def export(self, model, adapter=None):
        from lmforge.adapters.manager import merged_model
        return merged_model(model, adapter or ADAPTER)


REGISTRY: dict[str, Method] = {name: family for family in (WholeModel(), Features(), BitFit(), Bottleneck(),
                                                            Prefix(), Lora()) for name in family.names}
assert set(REGISTRY) == set(METHODS)


def get_method(method: str | MethodConfig) -> Method:
    name = method.method if isinstance(method, MethodConfig) else method
    if name not in REGISTRY:
        raise ConfigError(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return REGISTRY[name]


def method_of_dir(directory: Path) -> Method:
    """The method family that wrote a run's best/ (or an adapter / model directory)."""
    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        return REGISTRY["lora"]
    if (directory / "delta.json").is_file():
        from lmforge.utils.confine import Confined
        try:  # inside the directory, a regular file, bounded (a symlink out of it or a FIFO is refused)
            meta = Confined(directory).read_json(directory / "delta.json")
            return get_method(meta["method"]["method"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{directory / 'delta.json'}: cannot be read ({e})") from None
    if (directory / "probe.json").is_file():
        return REGISTRY["features"]
    return REGISTRY["full"]


def load_run(directory, device: str = "cpu"):
    """(model, adapter) of a run's best/ directory: the adapted model in eval mode and the adapter
    name its forward passes route to (None: the model is adapted as a whole)."""
    directory = Path(directory)
    return method_of_dir(directory).load(directory, device)


def apply_method(model, m: MethodConfig) -> Method:
    """Everything trains, then the method decides what it adds and what stays frozen."""
    for p in model.parameters():
        p.requires_grad_(True)
    method = get_method(m)
    method.attach(model, m)
    if model.config.head in LM_HEADS and not isinstance(method, WholeModel) and model.head is not None:
        for p in model.head.parameters():   # the output layer stays the base model's
            p.requires_grad_(False)
    return method


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_parameters(model) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"
