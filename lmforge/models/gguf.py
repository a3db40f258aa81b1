"""Read a llama.cpp GGUF checkpoint as the Hugging Face checkpoint it was converted from.

`read_gguf(path)` returns `(config, state_dict)`: a Hugging Face style config dict (the fields of a
Llama config.json) and float32 tensors under Hugging Face names, so the model loads it exactly like a
safetensors checkpoint. Quantized tensors are dequantized with the `gguf` package's own
implementation of llama.cpp's formats; nothing stays quantized. `read_gguf_metadata(path)` gives the
raw key/value metadata (the tokenizer lives there; lmforge.data.gguf_tokenizer builds it).

Only the Llama architecture (`general.architecture == "llama"`: Llama, SmolLM, Mistral-style files) is
read; any other architecture, and any file that is not a complete GGUF file, is a one-line
CheckpointError naming the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (inside blk.N) -> Hugging Face Llama module name (inside model.layers.N)
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


def is_gguf_file(path: str | os.PathLike) -> bool:
    """A file that starts with the GGUF magic (what it is, whatever its name)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _open(path: Path):
    """A gguf.GGUFReader over the file, or a one-line CheckpointError saying why not."""
    from gguf import GGUFReader  # imported here: only GGUF users pay for it

    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        # The reader parses the header, all metadata and the tensor table, and maps every tensor's
        # bytes: a file cut short anywhere fails here rather than at the first tensor read.
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on bad bytes
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({_one_line(e)})") from None


def _metadata(reader, path: Path) -> dict:
    """Every key/value pair as plain Python values (arrays as lists); the GGUF.* header entries are
    not metadata and are left out."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception as e:  # e.g. a string that is not UTF-8
            raise CheckpointError(f"{path}: metadata field {key!r} cannot be read ({_one_line(e)})") from None
    return out


def read_gguf_metadata(path: str | os.PathLike) -> dict:
    """The file's metadata: {"general.architecture": "llama", "tokenizer.ggml.tokens": [...], ...}."""
    p = Path(path)
    return _metadata(_open(p), p)


def _get(meta: dict, key: str, path: Path, kind=int, default=None):
    value = meta.get(key, default)
    if value is None:
        raise CheckpointError(f"{path}: metadata field {key!r} is missing")
    if kind is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise CheckpointError(f"{path}: metadata field {key!r} must be an integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float, np.number)):
        raise CheckpointError(f"{path}: metadata field {key!r} must be a number, got {value!r}")
    return kind(value)


def _config(meta: dict, tensor_names: set[str], path: Path) -> dict:
    """The Hugging Face LlamaConfig fields this file states (llama.cpp's `<arch>.*` keys renamed)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    a = arch + "."
    hidden = _get(meta, a + "embedding_length", path)
    heads = _get(meta, a + "attention.head_count", path)
    kv_heads = _get(meta, a + "attention.head_count_kv", path, default=heads)
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise CheckpointError(f"{path}: {a}attention.head_count {heads} must be a positive multiple of "
                              f"{a}attention.head_count_kv {kv_heads}")
    head_dim = _get(meta, a + "attention.key_length", path, default=hidden // heads)
    rope_dim = _get(meta, a + "rope.dimension_count", path, default=head_dim)
    if rope_dim != head_dim:
        # Llama rotates whole heads; a partial rotary dimension is another architecture
        raise CheckpointError(f"{path}: {a}rope.dimension_count {rope_dim} != head dimension {head_dim} "
                              "(partial rotary embeddings are not supported)")
    # older files state no vocab_size: the vocabulary is the tokenizer's
    tokenizer_vocab = len(meta.get("tokenizer.ggml.tokens") or []) or None
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": _get(meta, a + "vocab_size", path, default=tokenizer_vocab),
        "hidden_size": hidden,
        "intermediate_size": _get(meta, a + "feed_forward_length", path),
        "num_hidden_layers": _get(meta, a + "block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": _get(meta, a + "context_length", path),
        "rope_theta": _get(meta, a + "rope.freq_base", path, float, default=10000.0),
        "rms_norm_eps": _get(meta, a + "attention.layer_norm_rms_epsilon", path, float),
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
    }
    scaling = meta.get(a + "rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling,
                                  "factor": _get(meta, a + "rope.scaling.factor", path, float)}
        if a + "rope.scaling.original_context_length" in meta:
            config["rope_scaling"]["original_max_position_embeddings"] = _get(
                meta, a + "rope.scaling.original_context_length", path)
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if "tokenizer.ggml." + gguf_key in meta:
            config[hf_key] = _get(meta, "tokenizer.ggml." + gguf_key, path)
    return config


def hf_name(gguf_name: str, path: Path, num_layers: int) -> str:
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"; unknown names are an error
    (a tensor the model would silently not use)."""
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        layer = int(m.group(1))
        if layer >= num_layers:
            raise CheckpointError(f"{path}: tensor {gguf_name!r} is past the {num_layers} layers the metadata states")
        return f"model.layers.{layer}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.fullmatch(gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise CheckpointError(f"{path}: unexpected tensor {gguf_name!r} for a Llama GGUF file")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of a Q or K projection's output rows.

    Within each head, llama.cpp (like Meta's original checkpoints) stores the two coordinates of each
    rotary pair next to each other, rows (x0, y0, x1, y1, ...), because its RoPE rotates adjacent
    pairs. Hugging Face's Llama rotates the first half of the head against the second half
    (rotate_half), so it wants rows (x0, x1, ..., y0, y1, ...). Applies to weights [rows, in] and
    biases [rows] alike."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    # [rows, *rest] -> [heads, head_dim/2 (pair), 2 (coordinate), *rest] -> swap pair/coordinate
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


def _dequantize(tensor, path: Path) -> torch.Tensor:
    """One tensor as float32 [rows, cols] (PyTorch's [out, in] layout; GGUF lists dims innermost first)."""
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor {tensor.name!r}: {_one_line(e)}") from None
    expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if values.shape != expected:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} dequantizes to shape {values.shape}, "
                              f"expected {expected}")
    # a copy: the F32/F16 paths return views of the read-only memory map
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True))


def _check_shape(name: str, t: torch.Tensor, config: dict, path: Path) -> None:
    h, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d, hd, ff, v = config["hidden_size"], config["head_dim"], config["intermediate_size"], config["vocab_size"]
    suffix = name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
    expected = {
        "embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "norm.weight": (d,),
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "q_proj.weight": (h * hd, d), "k_proj.weight": (kv * hd, d), "v_proj.weight": (kv * hd, d),
        "o_proj.weight": (d, h * hd), "q_proj.bias": (h * hd,), "k_proj.bias": (kv * hd,),
        "v_proj.bias": (kv * hd,), "o_proj.bias": (d,),
        "gate_proj.weight": (ff, d), "up_proj.weight": (ff, d), "down_proj.weight": (d, ff),
        "gate_proj.bias": (ff,), "up_proj.bias": (ff,), "down_proj.bias": (d,),
    }.get(suffix)
    if expected is not None and tuple(t.shape) != expected:
        raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the metadata implies {expected}")


def read_gguf_config(path: str | os.PathLike) -> dict:
    """The Hugging Face config dict of a GGUF file, from its metadata and tensor table alone (no
    tensor is dequantized)."""
    p = Path(path)
    reader = _open(p)
    return _config(_metadata(reader, p), {t.name for t in reader.tensors}, p)


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(Hugging Face config dict, float32 state dict under Hugging Face Llama names).

    A tied model (no output.weight in the file) has no lm_head.weight, as in a Hugging Face
    safetensors checkpoint of a tied model; config["tie_word_embeddings"] says so."""
    p = Path(path)
    reader = _open(p)
    meta = _metadata(reader, p)
    names = [t.name for t in reader.tensors]
    config = _config(meta, set(names), p)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, p, config["num_hidden_layers"])
        if name in state:
            raise CheckpointError(f"{p}: tensor {tensor.name!r} appears twice")
        w = _dequantize(tensor, p)
        _check_shape(name, w, config, p)
        if ".attn_q." in tensor.name:
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            w = unpermute_rope_rows(w, config["num_key_value_heads"])
        state[name] = w
    for gguf_name in ("token_embd.weight", "output_norm.weight"):  # per-layer gaps: the model loader names them
        if hf_name(gguf_name, p, 0) not in state:
            raise CheckpointError(f"{p}: tensor {gguf_name!r} is missing")
    return config, state
