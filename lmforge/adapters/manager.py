"""Adapters on a model: add, activate, delete, merge and unmerge LoRA adapters by name; mixed-adapter
batches; and a task head per adapter, so that an adapter always travels with the head it was trained
with.

Targets are paths inside a Transformer layer (query, key, value, attention.output, intermediate,
output), so "output" means the FFN output and never also the attention output; a full module path
(transformer.pooler) names one module outside the layers.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from lmforge.adapters.lora import LoraConfig, LoraLinear, Router
from lmforge.errors import ConfigError

TARGET_ALIASES = {"query": "attention.query", "key": "attention.key", "value": "attention.value",
                  "q": "attention.query", "k": "attention.key", "v": "attention.value",
                  "attn_out": "attention.output", "o": "attention.output",
                  "ffn_in": "intermediate", "ffn_out": "output"}
LAYER_TARGETS = ("query", "key", "value", "attention.output", "intermediate", "output")


def _state(model) -> dict:
    """Adapter bookkeeping kept on the model: router, configs, per-adapter heads and head settings."""
    if "_adapters" not in model.__dict__:
        model.__dict__["_adapters"] = {"router": Router(), "configs": {}, "head_config": {},
                                       "base_head": model.head, "base_config": model.config}
        model.add_module("adapter_heads", nn.ModuleDict())
    return model.__dict__["_adapters"]


def adapters(model) -> dict[str, LoraConfig]:
    return dict(_state(model)["configs"]) if "_adapters" in model.__dict__ else {}


def lora_layers(model) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _targets(model, patterns) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every nn.Linear the patterns name, in layer order."""
    found, unmatched = [], []
    for pattern in patterns:
        path = TARGET_ALIASES.get(pattern, pattern)
        hits = []
        if path.startswith("transformer."):  # a full path outside the layers (PEFT's "dense" hits the pooler)
            parent_path, _, attr = path.rpartition(".")
            try:
                parent = model.get_submodule(parent_path)
            except AttributeError:
                parent = None
            if isinstance(getattr(parent, attr, None), (nn.Linear, LoraLinear)):
                hits.append((parent, attr))
        for layer in model.transformer.layers if not hits else ():
            parent_path, _, attr = path.rpartition(".")
            try:
                parent = layer.get_submodule(parent_path) if parent_path else layer
            except AttributeError:
                continue
            module = getattr(parent, attr, None)
            if isinstance(module, (nn.Linear, LoraLinear)):
                hits.append((parent, attr))
        if not hits:
            unmatched.append(pattern)
        found.extend(hits)
    if unmatched:
        raise ConfigError(f"LoRA target {unmatched[0]!r} matched no module (targets are paths inside a "
                          f"layer: {', '.join(LAYER_TARGETS)})")
    return found


def add_adapter(model, name: str, config: LoraConfig, head: nn.Module | None | bool = True,
                head_config: dict | None = None) -> None:
    """Add LoRA adapter `name` to the target layers. head=True gives the adapter its own copy of the
    model's current head (a module may be passed instead; False: the adapter has no head)."""
    st = _state(model)
    if not name or "." in name:
        raise ConfigError(f"adapter name {name!r} must be non-empty and contain no '.'")
    if name in st["configs"]:
        raise ConfigError(f"adapter {name!r} already exists (loaded: {', '.join(st['configs'])})")
    for parent, attr in _targets(model, config.target_modules):
        module = getattr(parent, attr)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module, st["router"])
            setattr(parent, attr, module)
        module.add(name, config)
    st["configs"][name] = config
    if head is True and st["base_head"] is not None:
        head = copy.deepcopy(st["base_head"])
    if isinstance(head, nn.Module):
        model.adapter_heads[name] = head
        st["head_config"][name] = head_config or {}
    # new modules (LoRA dropout, the head's dropout) follow the model's mode: an adapter loaded onto
    # a model in eval() must not drop out
    for layer in lora_layers(model).values():
        if name in layer.lora_dropout:
            layer.lora_dropout[name].train(model.training)
    if name in model.adapter_heads:
        model.adapter_heads[name].train(model.training)
    st["router"].version += 1


def delete_adapter(model, name: str) -> None:
    st = _state(model)
    _require(model, [name])
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            layer.remove(name)
    del st["configs"][name]
    if name in model.adapter_heads:
        del model.adapter_heads[name]
    st["head_config"].pop(name, None)
    if name in st["router"].active:
        set_active(model, [n for n in st["router"].active if n != name])
    st["router"].version += 1


def _require(model, names) -> None:
    loaded = adapters(model)
    for n in names:
        if n not in loaded:
            raise ConfigError(f"no adapter named {n!r} (loaded: {', '.join(loaded) or 'none'})")


def set_active(model, names: list[str] | str | None) -> None:
    """Apply these adapters to every example (none: the base model). With one adapter that has a
    head, the model's head and label settings become that adapter's."""
    names = [names] if isinstance(names, str) else list(names or [])
    _require(model, names)
    st = _state(model)
    st["router"].active = names
    own = [n for n in names if n in model.adapter_heads]
    if len(own) == 1:
        model.head = model.adapter_heads[own[0]]
        model.config = st["base_config"].replace(**st["head_config"][own[0]])
    else:
        model.head, model.config = st["base_head"], st["base_config"]


def merge(model, name: str | None = None) -> None:
    """Fold B A into W for `name` (default: the active adapters). Explicit, never a side effect."""
    names = [name] if name else list(_state(model)["router"].active)
    _require(model, names)
    for layer in lora_layers(model).values():
        for n in names:
            if n in layer.lora_A:
                layer.merge(n)


def unmerge(model, name: str | None = None) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge(name)


def mark_trainable(model, name: str) -> None:
    """Only adapter `name` (its A, B, its head, and the biases its config asks for) trains."""
    config = adapters(model)[name]
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            layer.lora_A[name].weight.requires_grad_(True)
            layer.lora_B[name].weight.requires_grad_(True)
            if config.bias == "lora_only" and layer.base.bias is not None:
                layer.base.bias.requires_grad_(True)
    if config.bias == "all":
        for n, p in model.transformer.named_parameters():
            if n.endswith("bias"):
                p.requires_grad_(True)
    if name in model.adapter_heads:
        for p in model.adapter_heads[name].parameters():
            p.requires_grad_(True)


@contextlib.contextmanager
def mixed_batch(model, names: list[str | None], packed=None):
    """Within this block each example i uses adapter names[i] (None: the base model). With a
    packed batch (models.packing.Packed), pass its layout so each token finds its example."""
    _require(model, [n for n in names if n])
    router = _state(model)["router"]
    if router.active:
        raise ConfigError("deactivate adapters (set_active(model, None)) before a mixed batch")
    slots = sorted({n for n in names if n})
    device = next(model.parameters()).device
    router.slots = slots
    router.per_example = torch.tensor([slots.index(n) if n else -1 for n in names], device=device)
    if packed is not None:
        router.per_token = router.per_example[packed.seq_ids]
    try:
        yield
    finally:
        router.per_example, router.per_token, router.slots = None, None, []


def classify_mixed(model, input_ids, attention_mask, token_type_ids, names: list[str | None],
                   packed=None) -> list:
    """One forward pass for a batch whose examples name different adapters; each example's logits
    come from its own adapter's head (heads are tiny: they run per adapter group). Padded inputs
    [B, T] with their mask, or packed [N] streams with their layout (attention_mask unused)."""
    with mixed_batch(model, names, packed):
        hidden = model.transformer(input_ids, attention_mask, token_type_ids, packed=packed)
    if packed is not None:  # heads read the first/last token: hand them a padded view
        hidden, attention_mask = packed.pad(hidden), packed.attention_mask()
    pooled = model.transformer.pool(hidden) if model.transformer.pooler is not None else None
    out: list = [None] * len(names)
    base_head = _state(model)["base_head"]
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        head = model.adapter_heads[name] if name in model.adapter_heads else base_head
        logits = head(hidden[rows], pooled[rows] if pooled is not None else None, attention_mask[rows])
        for j, i in enumerate(rows):
            out[i] = logits[j]
    return out


def merged_model(model, name: str):
    """A plain model (no adapter modules) whose weights have adapter `name` folded in, with the
    adapter's head: what `lmforge export --merged` writes. The adapted model is left unmerged."""
    from lmforge.models import Model

    set_active(model, name)
    merge(model, name)
    try:
        plain = Model(model.config)
        state = {k.replace(".base.", "."): v for k, v in model.state_dict().items()
                 if ".lora_" not in k and not k.startswith("adapter_heads.")}
        plain.load_state_dict(state)  # strict: every weight accounted for
    finally:
        unmerge(model, name)
    return plain.to(next(model.parameters()).device).eval()
