"""Hugging Face compatibility: config.json <-> ModelConfig, and the parameter-name key map.

Our module names follow BERT's, so the map is a table of module renames. GPT-2 needs two more
facts: its Conv1D layers store weights as [in, out] (transposed), and its c_attn fuses query, key
and value into one [D, 3D] matrix, which we split on load and fuse on save. Llama needs the
opposite: its gate_proj and up_proj are the two halves of our gated `intermediate` [2I, D], fused on
load and split on save.

A configuration whose recipe `transformers` has no class for (pre-LayerNorm BERT without biases,
a gated FFN, sinusoidal positions: Cramming's BERT) is a *variant*: it is saved with model_type
"lmforge", the whole ModelConfig under "lmforge_config" and our own tensor names, so transformers
refuses it with a clear "unrecognized model" instead of loading something else, and lmforge reads
it back exactly. `variant_features(config)` says what transformers lacks.
"""

from __future__ import annotations

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.models.config import ModelConfig

BASE_PREFIX = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "llama": "model."}

# Head <-> Hugging Face class. scalar has no class of its own: it is saved as the class whose
# logits it reproduces (a 1-label token classifier for encoders, GPT-2's 1-label sequence
# classifier, whose score is the last token's value) and marked with "lmforge_head".
ARCHITECTURES = {
    "bert": {None: "BertModel", "mlm": "BertForMaskedLM", "nsp": "BertForNextSentencePrediction",
             "pretraining": "BertForPreTraining", "classification": "BertForSequenceClassification",
             "token-classification": "BertForTokenClassification", "scalar": "BertForTokenClassification"},
    "roberta": {None: "RobertaModel", "mlm": "RobertaForMaskedLM",
                "classification": "RobertaForSequenceClassification",
                "token-classification": "RobertaForTokenClassification",
                "scalar": "RobertaForTokenClassification"},
    "gpt2": {None: "GPT2Model", "causal-lm": "GPT2LMHeadModel",
             "classification": "GPT2ForSequenceClassification",
             "token-classification": "GPT2ForTokenClassification",
             "scalar": "GPT2ForSequenceClassification"},
    "llama": {None: "LlamaModel", "causal-lm": "LlamaForCausalLM",
              "classification": "LlamaForSequenceClassification",
              "token-classification": "LlamaForTokenClassification",
              "scalar": "LlamaForSequenceClassification"},
}
HEAD_OF_ARCHITECTURE = {
    arch: head for table in ARCHITECTURES.values() for head, arch in table.items() if head != "scalar"
}
HEAD_OF_ARCHITECTURE["BertLMHeadModel"] = "mlm"

_BERT_LAYER = {
    "attention.query": "attention.self.query", "attention.key": "attention.self.key",
    "attention.value": "attention.self.value", "attention.output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
    "output": "output.dense", "ffn_norm": "output.LayerNorm",
}
_GPT2_LAYER = {
    "attention_norm": "ln_1", "attention.output": "attn.c_proj", "ffn_norm": "ln_2",
    "intermediate": "mlp.c_fc", "output": "mlp.c_proj",
}
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_LLAMA_LAYER = {
    "attention.query": "self_attn.q_proj", "attention.key": "self_attn.k_proj",
    "attention.value": "self_attn.v_proj", "attention.output": "self_attn.o_proj",
    "attention_norm": "input_layernorm", "output": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}
_LLAMA_GLU = ("gate_proj", "up_proj")   # the halves of our `intermediate`, in this order
_QKV = ("query", "key", "value")
_HEADS = {
    ("bert", "mlm"): {"head.transform": "cls.predictions.transform.dense",
                      "head.norm": "cls.predictions.transform.LayerNorm", "head.bias": "cls.predictions.bias",
                      "head.decoder": "cls.predictions.decoder"},  # untied embeddings only
    ("bert", "nsp"): {"head.seq_relationship": "cls.seq_relationship"},
    ("bert", "classification"): {"head.out_proj": "classifier"},
    ("bert", "token-classification"): {"head.out_proj": "classifier"},
    ("roberta", "mlm"): {"head.transform": "lm_head.dense", "head.norm": "lm_head.layer_norm",
                         "head.bias": "lm_head.bias", "head.decoder": "lm_head.decoder"},
    ("roberta", "classification"): {"head.dense": "classifier.dense", "head.out_proj": "classifier.out_proj"},
    ("roberta", "token-classification"): {"head.out_proj": "classifier"},
    ("gpt2", "causal-lm"): {"head.decoder": "lm_head"},
    ("gpt2", "classification"): {"head.out_proj": "score"},
    ("gpt2", "token-classification"): {"head.out_proj": "classifier"},
    ("llama", "causal-lm"): {"head.decoder": "lm_head"},
    ("llama", "classification"): {"head.out_proj": "score"},
    ("llama", "token-classification"): {"head.out_proj": "score"},
}
_HEADS[("bert", "pretraining")] = {**_HEADS[("bert", "mlm")], **_HEADS[("bert", "nsp")]}
_HEADS[("bert", "scalar")] = _HEADS[("bert", "token-classification")]
_HEADS[("roberta", "scalar")] = _HEADS[("roberta", "token-classification")]
_HEADS[("gpt2", "scalar")] = _HEADS[("gpt2", "classification")]
_HEADS[("llama", "scalar")] = _HEADS[("llama", "classification")]

# Keys in real checkpoints that hold no parameter of ours: buffers, and decoders tied to embeddings.
_IGNORED_SUFFIXES = (".position_ids", ".attn.bias", ".attn.masked_bias",  # dot: not c_attn.bias
                     ".rotary_emb.inv_freq")  # older Llama checkpoints saved the rotary frequencies
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
         "lm_head.decoder.weight", "lm_head.decoder.bias")


VARIANT = "lmforge"   # model_type of a saved variant


def variant_features(config: ModelConfig) -> list[str]:
    """The recipe choices of `config` that transformers' classes for its model_type do not have
    ([]: it saves and loads as a plain BERT, RoBERTa, GPT-2 or Llama checkpoint)."""
    if config.is_encoder_decoder:   # transformers' Marian lays its sinusoids out differently
        return ["an encoder-decoder (saved with lmforge's names; tests/test_encoder_decoder.py compares it "
                "with transformers' MarianMTModel)"]
    if config.model_type == "llama":
        return [f"{name}={getattr(config, name)!r} (Llama has {want!r})"
                for name, want in LLAMA_RECIPE.items() if getattr(config, name) != want]
    decoder = config.model_type == "gpt2"   # GPT-2: pre-norm with a final LayerNorm; BERT: post-norm
    out = []
    if config.pre_norm != decoder:
        out.append("pre-LayerNorm blocks" if config.pre_norm else "post-LayerNorm blocks")
    if config.embedding_norm == decoder:
        out.append("a LayerNorm on the embeddings" if config.embedding_norm else "no embedding LayerNorm")
    if config.final_norm != decoder:
        out.append("a final LayerNorm" if config.final_norm else "no final LayerNorm")
    if not config.linear_bias:
        out.append("no linear biases")
    if config.ffn != "mlp":
        out.append(f"a gated ({config.ffn}) feed-forward network")
    if config.position_embedding != "learned":
        out.append(f"{config.position_embedding} positions")
    if not decoder and not config.type_vocab_size:
        out.append("no token-type embeddings")
    if config.norm != "layernorm":
        out.append(f"{config.norm} normalisation")
    if config.num_kv_heads != config.num_heads:
        out.append("grouped-query attention")
    if config.head_dim * config.num_heads != config.hidden_size:
        out.append(f"head_dim {config.head_dim} (not hidden_size / num_heads)")
    return out


# What transformers' Llama is, as ModelConfig fields (biases, head counts and sizes are free)
LLAMA_RECIPE = dict(pre_norm=True, embedding_norm=False, final_norm=True, norm="rmsnorm", ffn="glu",
                    position_embedding="rope", hidden_act="silu", type_vocab_size=0)


def module_renames(config: ModelConfig) -> dict[str, str]:
    """Our module (or parameter) path -> the Hugging Face one, trunk paths without the base prefix."""
    r: dict[str, str] = {}
    t = "transformer."
    if config.model_type in ("bert", "roberta"):
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            r[f"{t}embeddings.{name}"] = f"embeddings.{name}"
        r[f"{t}embeddings.norm"] = "embeddings.LayerNorm"
        r[f"{t}pooler"] = "pooler.dense"
        for i in range(config.num_layers):
            for ours, theirs in _BERT_LAYER.items():
                r[f"{t}layers.{i}.{ours}"] = f"encoder.layer.{i}.{theirs}"
    elif config.model_type == "llama":
        r[f"{t}embeddings.word_embeddings"] = "embed_tokens"
        r[f"{t}final_norm"] = "norm"
        for i in range(config.num_layers):
            for ours, theirs in _LLAMA_LAYER.items():
                r[f"{t}layers.{i}.{ours}"] = f"layers.{i}.{theirs}"
    else:
        r[f"{t}embeddings.word_embeddings"] = "wte"
        r[f"{t}embeddings.position_embeddings"] = "wpe"
        r[f"{t}final_norm"] = "ln_f"
        for i in range(config.num_layers):
            for ours, theirs in _GPT2_LAYER.items():
                r[f"{t}layers.{i}.{ours}"] = f"h.{i}.{theirs}"
    r.update(_HEADS.get((config.model_type, config.head), {}))
    return r


def _rename(key: str, renames: dict[str, str]) -> str | None:
    if key in renames:
        return renames[key]
    module, _, leaf = key.rpartition(".")
    return f"{renames[module]}.{leaf}" if module in renames else None


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> tensors under Hugging Face names, for `transformers` to load (a variant:
    our own names, unchanged)."""
    if variant_features(config):
        return {k: v.contiguous() for k, v in state.items()}
    renames = module_renames(config)
    prefix = BASE_PREFIX[config.model_type] if config.head is not None else ""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if config.model_type == "gpt2" and len(parts) == 6 and parts[4] in _QKV:
            # transformer.layers.{i}.attention.{q,k,v}.{weight,bias} -> h.{i}.attn.c_attn
            fused.setdefault(f"h.{parts[2]}.attn.c_attn.{parts[5]}", {})[parts[4]] = tensor
            continue
        if config.model_type == "llama" and len(parts) == 5 and parts[3] == "intermediate":
            # transformer.layers.{i}.intermediate.{weight,bias} [2I, ..] -> mlp.gate_proj, mlp.up_proj
            for half, name in zip(tensor.chunk(2, dim=0), _LLAMA_GLU):
                out[f"{prefix}layers.{parts[2]}.mlp.{name}.{parts[4]}"] = half.contiguous()
            continue
        name = _rename(key, renames)
        if name is None:
            raise ConfigError(f"no Hugging Face name for parameter {key!r} ({config.model_type})")
        if config.model_type == "gpt2" and name.endswith(".weight") and name[: -len(".weight")].endswith(_GPT2_CONV1D):
            tensor = tensor.t()
        out[(prefix if key.startswith("transformer.") else "") + name] = tensor.contiguous()
    for name, parts in fused.items():
        cat = torch.cat([parts[n] for n in _QKV], dim=0)  # [3D, D] or [3D]
        out[prefix + name] = (cat.t() if cat.dim() == 2 else cat).contiguous()  # Conv1D: [D, 3D]
    lm = {"bert": "cls.predictions", "roberta": "lm_head"}.get(config.model_type)
    if lm and config.head in ("mlm", "pretraining") and not config.tie_word_embeddings:
        # an untied decoder still shares its bias with the head in transformers, which expects
        # both names; a copy, since safetensors refuses tensors sharing memory
        out[f"{lm}.decoder.bias"] = out[f"{lm}.bias"].clone()
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: ModelConfig):
    """Hugging Face tensors -> (our state dict, unexpected HF keys). Shapes are checked by the caller."""
    if variant_features(config):  # saved under our own names
        return dict(hf), [], {k: k for k in hf}
    inverse = {v: k for k, v in module_renames(config).items()}
    base = BASE_PREFIX[config.model_type]
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    sources: dict[str, str] = {}  # our key -> the file's key, for error messages
    d = config.hidden_size
    glu: dict[str, dict[str, torch.Tensor]] = {}   # Llama: our intermediate key -> its two halves
    for orig, tensor in hf.items():
        key = orig[len(base):] if orig.startswith(base) else orig
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.endswith(_IGNORED_SUFFIXES) or (key in _TIED and config.tie_word_embeddings):
            continue
        if config.model_type == "gpt2" and ".attn.c_attn." in key:
            i, leaf = key.split(".")[1], key.rsplit(".", 1)[1]
            if leaf == "weight":
                tensor = tensor.t()  # Conv1D [D, 3D] -> [3D, D]
            if tensor.shape[0] != 3 * d:
                raise_shape(orig, tuple(tensor.shape), (3 * d,) + tuple(tensor.shape[1:]))
            for j, n in enumerate(_QKV):
                ours = f"transformer.layers.{i}.attention.{n}.{leaf}"
                out[ours], sources[ours] = tensor[j * d:(j + 1) * d], orig
            continue
        parts = key.split(".")
        if config.model_type == "llama" and len(parts) == 5 and parts[2] == "mlp" and parts[3] in _LLAMA_GLU:
            ours = f"transformer.layers.{parts[1]}.intermediate.{parts[4]}"
            glu.setdefault(ours, {})[parts[3]] = tensor
            sources[ours] = orig
            continue
        name = _rename(key, inverse)
        if name is None:
            unexpected.append(orig)
            continue
        if config.model_type == "gpt2" and key.endswith(".weight") and key[: -len(".weight")].endswith(_GPT2_CONV1D):
            tensor = tensor.t()
        out[name], sources[name] = tensor, orig
    for ours, halves in glu.items():
        if len(halves) == 2:  # with one half only, the loader reports the layer's FFN as missing
            out[ours] = torch.cat([halves[n] for n in _LLAMA_GLU], dim=0)  # [2I, D] or [2I]
    return out, unexpected, sources


def raise_shape(name: str, got: tuple, expected: tuple):
    raise CheckpointError(
        f"tensor {name!r} has shape {list(got)} but the config expects {list(expected)}"
    )


# ---- config.json ----------------------------------------------------------------------------

def config_from_hf(d: dict, source: str = "config.json", head: str | None = "auto") -> ModelConfig:
    """Read a transformers config dict. head="auto" takes it from `architectures`."""
    mt = d.get("model_type")
    if mt == VARIANT:
        return _variant_config(d, source, head)
    if mt not in ARCHITECTURES:
        raise ConfigError(
            f"{source}: model_type {mt!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    if head == "auto":
        head = d.get("lmforge_head")
        if head is None:
            arch = (d.get("architectures") or [None])[0]
            head = HEAD_OF_ARCHITECTURE.get(arch)
    id2label = d.get("id2label")
    if id2label and all(v == f"LABEL_{k}" for k, v in id2label.items()):
        id2label = None  # transformers' default names carry no information
    common = dict(
        model_type=mt, vocab_size=d["vocab_size"], initializer_range=d.get("initializer_range", 0.02),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        tie_word_embeddings=d.get("tie_word_embeddings", True), head=head,
        num_labels=d.get("num_labels", len(d["id2label"]) if d.get("id2label") else 2),
        id2label=id2label, problem_type=d.get("problem_type"),
        classifier_dropout=d.get("classifier_dropout"),
    )
    try:
        if mt == "llama":
            return _llama_config(d, source, common)
        if mt == "gpt2":
            for key, want in (("add_cross_attention", False), ("scale_attn_by_inverse_layer_idx", False),
                              ("scale_attn_weights", True)):
                if d.get(key, want) != want:
                    raise ConfigError(f"{source}: {key}={d[key]!r} is not supported (expected {want!r})")
            n = d["n_embd"]
            return ModelConfig(
                **common, hidden_size=n, num_layers=d["n_layer"], num_heads=d["n_head"],
                intermediate_size=d.get("n_inner") or 4 * n, max_position_embeddings=d["n_positions"],
                type_vocab_size=0, hidden_act=d.get("activation_function", "gelu_new"),
                layer_norm_eps=d.get("layer_norm_epsilon", 1e-5), hidden_dropout=d.get("resid_pdrop", 0.1),
                attention_dropout=d.get("attn_pdrop", 0.1), embedding_dropout=d.get("embd_pdrop", 0.1),
                pad_token_id=d.get("pad_token_id"),
            )
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"{source}: position_embedding_type {d['position_embedding_type']!r} "
                              "is not supported (expected 'absolute')")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ConfigError(f"{source}: {mt} as a decoder (is_decoder/add_cross_attention) is not supported")
        return ModelConfig(
            **common, hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
            max_position_embeddings=d["max_position_embeddings"], type_vocab_size=d.get("type_vocab_size", 2),
            hidden_act=d.get("hidden_act", "gelu"), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            hidden_dropout=d.get("hidden_dropout_prob", 0.1),
            attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=d.get("pad_token_id", 0 if mt == "bert" else 1),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing field {e.args[0]!r} for model_type {mt!r}") from None
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def _llama_config(d: dict, source: str, common: dict) -> ModelConfig:
    """transformers' LlamaConfig fields -> the Llama recipe (LLAMA_RECIPE) at this size. What our
    Llama does not do (rope scaling, other activations, tensor-parallel pretraining quirks, biases on
    attention but not the MLP) is refused, naming the field."""
    heads, hidden = d["num_attention_heads"], d["hidden_size"]
    kv_heads = d.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise ConfigError(f"{source}: num_key_value_heads {kv_heads!r} must divide num_attention_heads {heads}")
    # transformers 5 nests the rotary settings in rope_parameters; 4.x has rope_theta and rope_scaling
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported (expected 'default')")
    for key, want in (("hidden_act", "silu"), ("pretraining_tp", 1)):
        if d.get(key, want) != want:
            raise ConfigError(f"{source}: {key}={d[key]!r} is not supported (expected {want!r})")
    bias = d.get("attention_bias", False)
    if d.get("mlp_bias", False) != bias:
        raise ConfigError(f"{source}: mlp_bias={d.get('mlp_bias', False)!r} must equal attention_bias={bias!r} "
                          "(one linear_bias field covers both)")
    common = {**common, "tie_word_embeddings": d.get("tie_word_embeddings", False)}  # LlamaConfig's default
    return ModelConfig(
        **common, hidden_size=hidden, num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=kv_heads, head_dim=d.get("head_dim") or hidden // heads,
        intermediate_size=d["intermediate_size"], max_position_embeddings=d["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        layer_norm_eps=d.get("rms_norm_eps", 1e-6), linear_bias=bool(bias),
        hidden_dropout=0.0, attention_dropout=d.get("attention_dropout", 0.0), embedding_dropout=0.0,
        pad_token_id=d.get("pad_token_id"), **LLAMA_RECIPE,
    )


def _variant_config(d: dict, source: str, head) -> ModelConfig:
    fields = d.get("lmforge_config")
    if not isinstance(fields, dict):
        raise ConfigError(f"{source}: model_type 'lmforge' needs an 'lmforge_config' object")
    fields = {k: v for k, v in fields.items() if k != "name_or_path"}
    if head != "auto":
        fields["head"] = head
    try:
        return ModelConfig(**fields)
    except TypeError as e:  # an unknown or missing field
        raise ConfigError(f"{source}: lmforge_config: {e}") from None


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    c = config
    missing = variant_features(c)
    if missing:
        fields = {k: v for k, v in c.to_dict().items() if k != "name_or_path"}
        return {"model_type": VARIANT, "lmforge_config": fields, "dtype": str(dtype).removeprefix("torch."),
                "lmforge_note": f"a {c.model_type} variant transformers has no class for "
                                f"({', '.join(missing)}); load it with lmforge"}
    d: dict = {"model_type": c.model_type, "architectures": [ARCHITECTURES[c.model_type][c.head]]}
    if c.model_type == "gpt2":
        d.update(n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads,
                 n_inner=c.intermediate_size, n_positions=c.max_position_embeddings,
                 activation_function=c.hidden_act, layer_norm_epsilon=c.layer_norm_eps,
                 resid_pdrop=c.hidden_dropout, attn_pdrop=c.attention_dropout,
                 embd_pdrop=c.hidden_dropout if c.embedding_dropout is None else c.embedding_dropout)
    elif c.model_type == "llama":
        d.update(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                 num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
                 max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
                 rms_norm_eps=c.layer_norm_eps, attention_bias=c.linear_bias, mlp_bias=c.linear_bias,
                 attention_dropout=c.attention_dropout, rope_theta=c.rope_theta,
                 rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    else:
        d.update(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                 intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
                 type_vocab_size=c.type_vocab_size, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
                 hidden_dropout_prob=c.hidden_dropout, attention_probs_dropout_prob=c.attention_dropout,
                 position_embedding_type="absolute")
    d.update(vocab_size=c.vocab_size, initializer_range=c.initializer_range, pad_token_id=c.pad_token_id,
             bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
             tie_word_embeddings=c.tie_word_embeddings, dtype=str(dtype).removeprefix("torch."))
    if c.head in ("classification", "token-classification", "scalar"):
        labels = c.labels if c.head != "scalar" else ["LABEL_0"]
        d["id2label"] = {str(i): n for i, n in enumerate(labels)}
        d["label2id"] = {n: i for i, n in enumerate(labels)}
        if c.head == "classification":
            d["problem_type"] = "regression" if c.is_regression else "single_label_classification"
        if c.classifier_dropout is not None:
            d["classifier_dropout"] = c.classifier_dropout
    if c.head == "scalar":
        d["lmforge_head"] = "scalar"
    return d
