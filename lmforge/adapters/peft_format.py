"""LoRA adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors with PEFT's
key names (base_model.model.<Hugging Face module>.lora_A.weight), the adapter's head saved as PEFT
saves `modules_to_save`. `peft.PeftModel.from_pretrained` loads these files onto the `transformers`
model, and adapters saved by PEFT load here. Label names and the head type go into a small
lmforge_head.json beside them (PEFT ignores it). Saving is atomic.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from lmforge.adapters.lora import LoraConfig
from lmforge.adapters.manager import add_adapter, adapters, delete_adapter, lora_layers
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import hf
from lmforge.utils.atomic import atomic_dir
from lmforge.utils.confine import JSON_MAX_BYTES, Confined, Missing, MiB

PREFIX = "base_model.model."
TASK_TYPES = {"classification": "SEQ_CLS", "token-classification": "TOKEN_CLS", "causal-lm": "CAUSAL_LM",
              None: "FEATURE_EXTRACTION", "scalar": "TOKEN_CLS", "mlm": None}
# Keys PEFT writes for LoRA; the value is the only one we support where it matters (None: any).
KNOWN_KEYS = {
    "peft_type": "LORA", "r": None, "lora_alpha": None, "lora_dropout": None, "target_modules": None,
    "bias": None, "task_type": None, "modules_to_save": None, "base_model_name_or_path": None,
    "revision": None, "inference_mode": None, "init_lora_weights": None, "fan_in_fan_out": None,
    "peft_version": None, "auto_mapping": None, "alora_invocation_tokens": None, "alpha_pattern": {},
    "rank_pattern": {}, "arrow_config": None, "corda_config": None, "ensure_weight_tying": None,
    "eva_config": None, "exclude_modules": None, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": None, "lora_bias": False,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": None, "monteclora_config": None,
    "qalora_group_size": None, "target_parameters": None, "trainable_token_indices": None,
    "use_bdlora": None, "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
}


def _hf_names(config) -> tuple[dict[str, str], str]:
    if config.model_type == "gpt2":
        raise ConfigError("PEFT-format adapters are supported for bert and roberta; GPT-2's fused c_attn "
                          "is not mapped yet")
    prefix = hf.BASE_PREFIX[config.model_type] if config.head is not None else ""
    return hf.module_renames(config), prefix


def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name` (and its head) under PEFT's key names."""
    config = model.config
    renames, prefix = _hf_names(config)
    out = {}
    for path, layer in lora_layers(model).items():
        if name in layer.lora_A:
            if path not in renames:   # Llama's gate_proj and up_proj are one fused `intermediate` here
                raise ConfigError(f"LoRA target {path.split('.', 3)[-1]!r} has no PEFT name for "
                                  f"{config.model_type} (no Hugging Face module holds it alone)")
            module = prefix + renames[path]
            out[f"{PREFIX}{module}.lora_A.weight"] = layer.lora_A[name].weight.detach().cpu().contiguous()
            out[f"{PREFIX}{module}.lora_B.weight"] = layer.lora_B[name].weight.detach().cpu().contiguous()
    if name in model.adapter_heads:
        for k, v in model.adapter_heads[name].state_dict().items():
            hf_key = hf._rename(f"head.{k}", renames)
            if hf_key is not None:
                out[PREFIX + hf_key] = v.detach().cpu().contiguous()
    return out


def save_adapter(model, name: str, directory: str | Path, base_model: str = "", tokenizer=None) -> Path:
    """Write adapter `name` (and its head) atomically; a tokenizer (anything with .save(dir)) too."""
    cfg = adapters(model)[name]
    base_config = model.config
    tensors = adapter_state(model, name)
    head_modules = sorted({k[len(PREFIX):].split(".")[0] for k in tensors if ".lora_" not in k})
    peft_config = {
        "peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": _target_regex(base_config, cfg.target_modules), "bias": cfg.bias,
        "task_type": TASK_TYPES.get(base_config.head), "modules_to_save": head_modules or None,
        "base_model_name_or_path": base_model or base_config.name_or_path or None,
        "inference_mode": True, "init_lora_weights": True, "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "revision": None,
    }
    head = {"head": base_config.head, **model.adapter_head_configs.get(name, {})}
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / "lmforge_head.json").write_text(json.dumps(head, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(directory)


def _target_regex(config, targets) -> str:
    """PEFT full-matches a string target_modules against module names. A regex, unlike a list of
    suffixes, cannot let "output.dense" also catch "attention.output.dense"."""
    import re

    from lmforge.adapters.manager import TARGET_ALIASES

    renames, in_layer, outside = hf.module_renames(config), [], []
    for t in targets:
        path = TARGET_ALIASES.get(t, t)
        if path.startswith("transformer."):
            outside.append(re.escape(renames[path]))
        else:
            full = renames[f"transformer.layers.0.{path}"]       # encoder.layer.0.attention.self.query
            stack, inner = re.fullmatch(r"(.*?)\.0\.(.*)", full).groups()  # encoder.layer, attention.self.query
            in_layer.append(re.escape(inner))                    # (Llama: layers, self_attn.q_proj)
    alts = ([rf"{re.escape(stack)}\.\d+\.({'|'.join(sorted(in_layer))})"] if in_layer else []) + sorted(outside)
    return rf"(.*\.)?({'|'.join(alts)})"


def read_adapter_config(directory: Path, confined: Confined | None = None) -> dict:
    """adapter_config.json of `directory`, read under `confined` (default: the directory itself is
    the root, so the file may not be a symlink out of it; at most 1 MiB; a regular file)."""
    directory = Path(directory)
    path = directory / "adapter_config.json"
    confined = confined or _confine(directory)
    try:
        cfg = confined.read_json(path, JSON_MAX_BYTES)
    except Missing:
        raise ConfigError(f"{path}: not found (expected a PEFT/lmforge adapter directory)") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for key, value in cfg.items():
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} in the adapter config")
        want = KNOWN_KEYS[key]
        if want is not None and value not in (want, None) and not (want == {} and not value):
            raise ConfigError(f"{path}: {key}={value!r} is not supported (expected {want!r})")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing key {key!r}")
    return cfg


def _confine(directory: Path) -> Confined:
    try:
        return Confined(directory)
    except Missing:
        raise ConfigError(f"{directory}: not found (expected a PEFT/lmforge adapter directory)") from None


def weights_limit(model) -> int:
    """The largest adapter_model.safetensors read for `model`: twice its parameters' bytes (a LoRA
    adapter with its head is a small fraction of them) plus 16 MiB."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters()) + 16 * MiB


def load_adapter(model, directory: str | Path, name: str, confined: Confined | None = None) -> None:
    """Add adapter `name` from a PEFT-format directory onto a model of the same base. Its files are
    read under `confined` (default: the directory itself is the root): adapter_config.json,
    adapter_model.safetensors and lmforge_head.json only, regular files, sizes bounded
    (lmforge/utils/confine.py); a path leading out of the root raises confine.Escape."""
    directory = Path(directory)
    confined = confined or _confine(directory)
    cfg = read_adapter_config(directory, confined)
    weights_file = directory / "adapter_model.safetensors"
    try:
        tensors = load_bytes(confined.read_bytes(weights_file, {weights_file.name}, weights_limit(model)))
    except Missing:
        raise CheckpointError(f"{weights_file}: not found") from None
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{weights_file}: corrupt or truncated ({str(e).splitlines()[0]})") from None
    base_config = model.config
    renames, prefix = _hf_names(base_config)
    inverse = {v: k for k, v in renames.items()}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key.removeprefix(PREFIX).replace(".modules_to_save.default.", ".").replace(".default.", ".")
        if ".lora_" in k:
            module, kind = k.rsplit(".lora_", 1)
            ours = inverse.get(module.removeprefix(prefix))
            if ours is None:
                raise CheckpointError(f"{weights_file}: tensor {key!r} names no module of this "
                                      f"{base_config.model_type} model")
            lora.setdefault(ours, {})[kind.split(".")[0]] = t
        else:
            ours = hf._rename(k, inverse)
            if ours is None or not ours.startswith("head."):
                raise CheckpointError(f"{weights_file}: tensor {key!r} names no module of this model")
            head[ours.removeprefix("head.")] = t
    if not lora:
        raise CheckpointError(f"{weights_file}: no LoRA tensors")
    layers_prefix = "transformer.layers."
    targets = sorted({p.split(".", 3)[3] if p.startswith(layers_prefix) else p for p in lora})
    # PEFT's scaling is lora_alpha / r, with r from the config
    config = LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                        dropout=float(cfg.get("lora_dropout") or 0.0),
                        target_modules=tuple(targets), bias=cfg.get("bias") or "none")
    head_file = directory / "lmforge_head.json"
    head_config = confined.read_json(head_file, JSON_MAX_BYTES) if confined.is_file(head_file) else {}
    if not isinstance(head_config, dict):
        raise ConfigError(f"{head_file}: expected a JSON object")
    head_config.pop("head", None)
    if "id2label" in head_config and head_config["id2label"]:
        head_config["id2label"] = {int(k): v for k, v in head_config["id2label"].items()}
    if head and "num_labels" not in head_config and "out_proj.weight" in head:
        head_config["num_labels"] = head["out_proj.weight"].shape[0]  # a PEFT file: labels from the shape
    new_head = None
    if head:
        import copy
        base_head = model.head
        if base_head is None:
            raise CheckpointError(f"{weights_file}: the adapter has a head but the model has none")
        probe = base_head.__class__(base_config.replace(**head_config)) if head_config else copy.deepcopy(base_head)
        expected = probe.state_dict()
        for k, t in head.items():
            if k not in expected or expected[k].shape != t.shape:
                got = list(t.shape)
                want = list(expected[k].shape) if k in expected else "none"
                raise CheckpointError(f"{weights_file}: head tensor {k!r} has shape {got}, the model expects {want}")
        probe.load_state_dict(head, strict=False)
        new_head = probe.to(next(model.parameters()).device)
    add_adapter(model, name, config, head=new_head if new_head is not None else False, head_config=head_config)
    try:
        layers = lora_layers(model)
        for path, parts in lora.items():
            for kind, t in parts.items():
                param = (layers[path].lora_A if kind == "A" else layers[path].lora_B)[name].weight
                if param.shape != t.shape:
                    raise CheckpointError(
                        f"{weights_file}: tensor {path}.lora_{kind} has shape {list(t.shape)} but this model "
                        f"expects {list(param.shape)} (an adapter trained on another base?)")
                with torch.no_grad():
                    param.copy_(t)
    except BaseException:
        delete_adapter(model, name)  # nothing half-loaded stays behind
        raise
