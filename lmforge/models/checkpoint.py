"""Read and write Hugging Face model directories: config.json plus safetensors (or a
pytorch_model.bin read with weights_only=True, never as an arbitrary pickle). A llama.cpp GGUF file
(or an alias of one, "smollm2-135m") loads too: models/gguf.py reads it as the Hugging Face Llama
config and state dict it was converted from, dequantized to float32."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import gguf, hf
from lmforge.models.config import ModelConfig
from lmforge.models.hub import resolve
from lmforge.models.model import Model
from lmforge.utils.atomic import atomic_dir

log = logging.getLogger(__name__)
_SAFETENSORS, _INDEX, _BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: not found (expected a Hugging Face model directory with config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike, head: str | None = "auto") -> ModelConfig:
    directory = resolve(path)
    if directory.is_file():  # resolve() returns a file only for a GGUF checkpoint
        config = hf.config_from_hf(gguf.read_gguf_config(directory), str(directory), head)
    else:
        config = hf.config_from_hf(read_json(directory / "config.json"), str(directory / "config.json"), head)
    config.name_or_path = str(path)
    return config


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_one_line(e)})") from None


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a model directory and the file they came from."""
    if (directory / _SAFETENSORS).is_file():
        return _read_safetensors(directory / _SAFETENSORS), directory / _SAFETENSORS
    if (directory / _INDEX).is_file():
        index = read_json(directory / _INDEX)
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{directory / _INDEX}: empty weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_safetensors(directory / shard))
        return state, directory / _INDEX
    if (directory / _BIN).is_file():
        try:
            state = torch.load(directory / _BIN, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, a pickle with code in it, ...
            raise CheckpointError(f"{directory / _BIN}: cannot be read as plain tensors ({_one_line(e)})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{directory / _BIN}: expected a dict of tensors, got {type(state).__name__}")
        return state, directory / _BIN
    raise CheckpointError(f"{directory}: no weights ({_SAFETENSORS}, {_INDEX} or {_BIN})")


def from_pretrained(
    name_or_path: str | os.PathLike,
    head: str | None = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **overrides,
) -> Model:
    """Load a Hugging Face directory, a GGUF file, or an alias of either ("minilm", "smollm2-135m")
    as an lmforge Model.

    head="auto" keeps the checkpoint's own head; naming another head (e.g. "classification" on a
    bare encoder) creates it freshly initialised. `overrides` replace config fields, e.g.
    num_labels=3, id2label={...}, problem_type="regression", hidden_dropout=0.0.
    """
    directory = resolve(name_or_path)
    if directory.is_file():  # GGUF: config and tensors come from one read of the file
        hf_config, hf_state = gguf.read_gguf(directory)
        source = directory
        saved = hf.config_from_hf(hf_config, str(directory), "auto")
        config = saved if head == "auto" else hf.config_from_hf(hf_config, str(directory), head)
    else:
        saved = load_config(directory, "auto")
        config = saved if head == "auto" else load_config(directory, head)
        hf_state, source = read_weights(directory)
    config = config.replace(**overrides) if overrides else config
    config.name_or_path = str(name_or_path)
    model = Model(config)
    state, unexpected, sources = hf.from_hf_state_dict(hf_state, config)
    expected = model.state_dict()
    for key in [k for k in state if k not in expected]:  # e.g. another head's tensors
        unexpected.append(sources[key])
        del state[key]
    for key, want in expected.items():  # in model order: the first layer's weight is named first
        if key in state and tuple(state[key].shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: tensor {sources[key]!r} has shape {list(state[key].shape)} but the config "
                f"expects {list(want.shape)}"
            )
    missing = [k for k in expected if k not in state]
    fresh_head = config.head != saved.head  # a new head starts from its initialisation
    # so does BERT's pooler when the checkpoint's head had none (an MLM model fine-tuned to classify)
    fresh = ("head.",) + (("transformer.pooler.",) if fresh_head and not saved.has_pooler else ())
    trunk_missing = [k for k in missing if not (k.startswith(fresh) and fresh_head)]
    if trunk_missing:
        names = hf.to_hf_state_dict({k: expected[k] for k in trunk_missing}, config)
        shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
        raise CheckpointError(f"{source}: missing {len(names)} tensor(s) the config needs: {shown}")
    if missing:
        log.info("%s: head %r initialised randomly (%d tensors)", directory, config.head, len(missing))
    if unexpected:
        log.info("%s: ignored %d tensor(s) this model has no use for, e.g. %s",
                 source, len(unexpected), unexpected[0])
    model.load_state_dict(state, strict=False)
    return model.to(device=device, dtype=dtype)


def write_pretrained(model: Model, directory: Path, tokenizer=None) -> None:
    """Write config.json + model.safetensors (Hugging Face names) into an existing directory."""
    if getattr(model, "quantized", None):  # its int8 layers hold no state_dict weights: refuse, lose nothing
        raise ConfigError(f"cannot save a model whose base is quantized ({model.quantized}): save it before "
                          "quantizing (int8 inference weights are not a Hugging Face checkpoint)")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_file(hf.to_hf_state_dict(state, model.config), str(directory / _SAFETENSORS), metadata={"format": "pt"})
    config = hf.config_to_hf(model.config, model.dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)


def save_pretrained(model: Model, path: str | os.PathLike, tokenizer=None) -> Path:
    """write_pretrained into a temporary directory that replaces `path` only once complete."""
    with atomic_dir(path) as tmp:
        write_pretrained(model, tmp, tokenizer)
    return Path(path)
