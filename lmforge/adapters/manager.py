"""Adapters on a model: add, delete, merge and unmerge LoRA adapters by name; mixed-adapter
batches; and a task head per adapter (the model's head table, Model.add_head), so that an adapter
always travels with the head it was trained with.

There is no "active adapter": which adapters a forward pass uses is its `adapters=` argument
(`model(ids, mask, adapters="sst2")`, or a name per row for a mixed batch; see models/routing.py).

Targets are paths inside a Transformer layer (query, key, value, attention.output, intermediate,
output), so "output" means the FFN output and never also the attention output; a full module path
(transformer.pooler) names one module outside the layers.
"""

from __future__ import annotations

import contextlib
import copy

from torch import nn

from lmforge.adapters.lora import LoraConfig, LoraLinear
from lmforge.errors import ConfigError
from lmforge.models import routing

TARGET_ALIASES = {"query": "attention.query", "key": "attention.key", "value": "attention.value",
                  "q": "attention.query", "k": "attention.key", "v": "attention.value",
                  "attn_out": "attention.output", "o": "attention.output",
                  "ffn_in": "intermediate", "ffn_out": "output"}
LAYER_TARGETS = ("query", "key", "value", "attention.output", "intermediate", "output")


def adapters(model) -> dict[str, LoraConfig]:
    """The LoRA adapters on the model, with their configs."""
    return {n: c for n, c in model.adapter_configs.items() if isinstance(c, LoraConfig)}


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
    model's head (a module may be passed instead; False: the adapter has no head)."""
    if not name or "." in name:
        raise ConfigError(f"adapter name {name!r} must be non-empty and contain no '.'")
    if name in model.adapter_names:
        raise ConfigError(f"adapter {name!r} already exists (loaded: {', '.join(model.adapter_names)})")
    for parent, attr in _targets(model, config.target_modules):
        module = getattr(parent, attr)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            setattr(parent, attr, module)
        module.add(name, config)
    if head is True and model.head is not None:
        head = copy.deepcopy(model.head)
    if isinstance(head, nn.Module):
        # new modules (LoRA dropout, the head's dropout) follow the model's mode: an adapter loaded
        # onto a model in eval() must not drop out
        model.add_head(name, head.train(model.training), head_config)
    for layer in lora_layers(model).values():
        if name in layer.lora_dropout:
            layer.lora_dropout[name].train(model.training)
    model.register_adapter(name, config)   # last: a routing may name it from now on


def delete_adapter(model, name: str) -> None:
    _require(model, [name])
    layers = lora_layers(model).values()
    if any(name in layer.merged for layer in layers):
        raise ConfigError(f"adapter {name!r} is merged: unmerge it before deleting it")
    model.unregister_adapter(name)         # first: no routing may name it any more
    for layer in layers:
        if name in layer.lora_A:
            layer.remove(name)


def _require(model, names) -> None:
    loaded = adapters(model)
    for n in names:
        if n not in loaded:
            raise ConfigError(f"no adapter named {n!r} (loaded: {', '.join(loaded) or 'none'})")


def merge(model, name: str) -> None:
    """Fold B A into W for adapter `name`. Explicit, never a side effect. While merged, the model
    runs that adapter whatever a call's routing says (export; unmerge() undoes it)."""
    _require(model, [name])
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            layer.merge(name)


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
    """Within this block (on this thread) each example i uses adapter names[i] (None: the base model),
    for code that calls the trunk directly; Model.forward takes `adapters=names` itself. With a
    packed batch (models.packing.Packed), pass its layout so each token finds its example."""
    _require(model, [n for n in names if n])
    with routing.using(list(names), token_rows=packed.seq_ids if packed is not None else None):
        yield


def classify_mixed(model, input_ids, attention_mask, token_type_ids, names: list[str | None],
                   packed=None) -> list:
    """One forward pass for a batch whose examples name different adapters; example i's logits [C_i]
    come from its own adapter's head. Padded inputs [B, T] with their mask, or packed [N] streams
    with their layout (attention_mask unused)."""
    _require(model, [n for n in names if n])
    logits = model(input_ids, attention_mask, token_type_ids, packed=packed, adapters=list(names)).logits
    return list(logits)


def merged_model(model, name: str):
    """A plain model (no adapter modules) whose weights have adapter `name` folded in, with the
    adapter's head and label settings: what `lmforge export --merged` writes. The adapted model is
    left unmerged."""
    from lmforge.models import Model

    merge(model, name)
    try:
        plain = Model(model.config_for(name))
        state = {k.replace(".base.", "."): v for k, v in model.state_dict().items()
                 if ".lora_" not in k and not k.startswith("adapter_heads.")}
        if name in model.adapter_heads:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            state.update({f"head.{k}": v for k, v in model.adapter_heads[name].state_dict().items()})
        plain.load_state_dict(state)  # strict: every weight accounted for
    finally:
        unmerge(model, name)
    return plain.to(next(model.parameters()).device).eval()
