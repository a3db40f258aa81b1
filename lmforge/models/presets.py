"""Named architectures as data: `--arch` picks a recipe, `--size` its dimensions, both over the one
model definition (ModelConfig fields; models/transformer.py, layers.py).

  bert      post-LayerNorm, biases, GELU FFN, learned positions, tied embeddings (Devlin et al. 2019)
  roberta   BERT's network with RoBERTa's conventions: one token type, padding id 1, positions
            numbered after the padding index (Liu et al. 2019)
  gpt2      a causal decoder: pre-LayerNorm, final LayerNorm, tanh-GELU, no token types
  cramming  Cramming's BERT (Geiping & Goldstein 2022): pre-LayerNorm with an embedding and a final
            LayerNorm, no linear biases, a gated (GLU) FFN, scaled sinusoidal positions, no dropout
  llama     a causal decoder: pre-RMSNorm, final RMSNorm, no linear biases, SwiGLU FFN, rotary
            positions, no token types, no dropout (Touvron et al. 2023); set num_kv_heads for
            grouped-query attention, tie_word_embeddings=False for Llama's own untied output matrix
  transformer  the original encoder-decoder (Vaswani et al. 2017): post-LayerNorm encoder and decoder
            stacks of --size's depth each, cross-attention, ReLU FFN, sinusoidal positions, embeddings
            times sqrt(D) and one table for source, target and output; sequence-to-sequence tasks

Sizes follow the BERT miniatures (Turc et al. 2019) up to BERT-base. The vocabulary (and padding id)
come from the tokenizer a run uses, not from here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.models.config import ModelConfig

SIZES: dict[str, dict] = {
    "tiny":  dict(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512),
    "mini":  dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024),
    "small": dict(num_layers=4, hidden_size=512, num_heads=8, intermediate_size=2048),
    "base":  dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
}

ARCHS: dict[str, dict] = {
    "bert": dict(model_type="bert"),
    "roberta": dict(model_type="roberta", type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                    eos_token_id=2, max_position_embeddings=514, layer_norm_eps=1e-5),
    "gpt2": dict(model_type="gpt2", type_vocab_size=0, hidden_act="gelu_new", layer_norm_eps=1e-5,
                 max_position_embeddings=1024, embedding_dropout=0.1),
    "cramming": dict(model_type="bert", pre_norm=True, embedding_norm=True, final_norm=True,
                     linear_bias=False, ffn="glu", position_embedding="scaled-sinusoidal",
                     hidden_dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-12),
    "llama": dict(model_type="llama", type_vocab_size=0, norm="rmsnorm", linear_bias=False, ffn="glu",
                  hidden_act="silu", position_embedding="rope", rope_theta=10000.0, layer_norm_eps=1e-5,
                  max_position_embeddings=2048, hidden_dropout=0.0, attention_dropout=0.0,
                  embedding_dropout=0.0),
    # dropout 0.1 on the embeddings and every sublayer's output, none on attention weights (their P_drop)
    "transformer": dict(model_type="encoder-decoder", type_vocab_size=0, hidden_act="relu",
                        position_embedding="sinusoidal", layer_norm_eps=1e-5, max_position_embeddings=512,
                        hidden_dropout=0.1, attention_dropout=0.0),
}


def preset(arch: str, size: str, **overrides) -> ModelConfig:
    """The ModelConfig of `arch` at `size`, with `overrides` (e.g. vocab_size, head) on top."""
    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ConfigError(f"--size {size!r} is not one of {', '.join(SIZES)}")
    return ModelConfig(**{**ARCHS[arch], **SIZES[size], **overrides})


def config_from_file(path: str | Path, **overrides) -> ModelConfig:
    """A JSON file of ModelConfig fields; "arch" and "size" keys start from that preset, and the
    other keys replace its fields. Errors name the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (expected a JSON file of model settings)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of model settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name_or_path"}
    unknown = sorted(set(data) - known - {"arch", "size"})
    if unknown:
        raise ConfigError(f"{path}: unknown field {unknown[0]!r} (fields: arch, size, {', '.join(sorted(known))})")
    base = {}
    if "arch" in data or "size" in data:
        base = {**ARCHS.get(data.get("arch", "bert"), {}), **SIZES.get(data.get("size", "base"), {})}
        if data.get("arch", "bert") not in ARCHS:
            raise ConfigError(f"{path}: arch {data['arch']!r} is not one of {', '.join(ARCHS)}")
        if data.get("size", "base") not in SIZES:
            raise ConfigError(f"{path}: size {data['size']!r} is not one of {', '.join(SIZES)}")
    defaults = ModelConfig()
    for k, v in data.items():
        want = type(getattr(defaults, k, None))
        if k in known and want in (int, float, bool, str) and v is not None and not (
                isinstance(v, want) and not (want is int and isinstance(v, bool))
                or (want is float and isinstance(v, int) and not isinstance(v, bool))):
            raise ConfigError(f"{path}: field {k!r} must be {want.__name__}, got {v!r}")
    fields = {**base, **{k: v for k, v in data.items() if k not in ("arch", "size")}, **overrides}
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
