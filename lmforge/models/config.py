"""One dataclass configures every model: the trunk (BERT, RoBERTa, GPT-2, Llama, and variants of them
such as Cramming's BERT) and its head.

The recipe choices that tell architectures apart are fields, not classes: where the norms sit
(pre_norm, embedding_norm, final_norm) and which kind they are (LayerNorm or RMSNorm), linear biases,
a plain or gated FFN and its activation, learned, sinusoidal or rotary positions, grouped-query
attention (num_kv_heads), tied or untied output embeddings. Llama is pre-norm RMSNorm, no biases, a
SiLU-gated FFN (SwiGLU), rotary positions and (optionally) fewer key/value heads than query heads. Left at None, the first three follow model_type (what
BERT, RoBERTa and GPT-2 checkpoints have), and are stored resolved. models/presets.py names whole
recipes (--arch x --size).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lmforge.errors import ConfigError

MODEL_TYPES = ("bert", "roberta", "gpt2", "llama", "encoder-decoder")
DECODERS = ("gpt2", "llama")   # causal self-attention
# The original Transformer (Vaswani et al. 2017): an encoder stack (self-attention over the source)
# and a decoder stack (causal self-attention, then cross-attention to the encoder's output), sharing
# one embedding table with the output projection. Its recipe (post-norm, no embedding LayerNorm,
# sinusoidal positions, embeddings times sqrt(D), ReLU) is the default of model_type "encoder-decoder".
ENCODER_DECODERS = ("encoder-decoder",)
HEADS = (
    None,                    # the bare trunk: hidden states (and BERT's pooled output)
    "mlm",                   # masked LM: transform + LayerNorm + tied decoder + bias
    "nsp",                   # next-sentence prediction on the pooled output
    "pretraining",           # mlm + nsp (BertForPreTraining)
    "classification",        # sequence classification or regression (num_labels == 1)
    "token-classification",  # a label per token
    "causal-lm",             # next-token prediction with the tied embedding matrix
    "scalar",                # a scalar per token, pooled to one per sequence: reward and value models
)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
FFNS = (
    "mlp",   # out(act(in(x))): BERT, GPT-2
    "glu",   # out(act(gate(x)) * up(x)), gate and up as one [2I, D] matrix: GLU variants (Shazeer 2020);
             # with hidden_act "silu" it is Llama's SwiGLU
)
NORMS = (
    "layernorm",  # (x - mean) / std * w + b: BERT, GPT-2
    "rmsnorm",    # x / rms(x) * w, no centring and no bias (Zhang & Sennrich 2019): Llama
)
POSITIONS = (
    "learned",            # a trained table [max_positions, D]
    "sinusoidal",         # the fixed sin/cos table of Vaswani et al. (2017)
    "scaled-sinusoidal",  # the same times one trained scalar, starting at 1/sqrt(D) (Hua et al. 2022)
    "rope",               # no position vectors: queries and keys are rotated by position (Su et al. 2021)
)


@dataclass
class ModelConfig:
    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12                  # an encoder-decoder's encoder layers
    num_decoder_layers: int | None = None # an encoder-decoder's decoder layers (None = num_layers)
    num_heads: int = 12
    num_kv_heads: int | None = None       # key/value heads, shared by num_heads / num_kv_heads query heads
                                          # each (grouped-query attention); None = num_heads
    head_dim: int | None = None           # None = hidden_size // num_heads
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2              # 0 = no token-type embeddings (GPT-2)
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12         # the eps of either norm (Llama's rms_norm_eps)
    hidden_dropout: float = 0.1           # after each sublayer, before the residual add
    attention_dropout: float = 0.1        # on the attention probabilities
    embedding_dropout: float | None = None  # None = hidden_dropout (GPT-2 has its own embd_pdrop)
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = True
    # Architecture recipe (None: as model_type's checkpoints have it, resolved in __post_init__)
    pre_norm: bool | None = None          # LayerNorm before each sublayer (GPT-2) or after the residual add (BERT)
    embedding_norm: bool | None = None    # a LayerNorm on the embeddings (default: post-norm models)
    final_norm: bool | None = None        # a LayerNorm after the last block (default: pre-norm models)
    linear_bias: bool = True              # biases in the attention and FFN projections
    ffn: str = "mlp"                      # one of FFNS
    position_embedding: str = "learned"   # one of POSITIONS
    rope_theta: float = 10000.0           # rotary base: wavelengths 2pi .. rope_theta * 2pi
    norm: str = "layernorm"               # one of NORMS
    scale_embedding: bool | None = None   # word embeddings times sqrt(hidden_size) (Vaswani et al. 3.4);
                                          # None: true for encoder-decoder, false otherwise
    decoder_start_token_id: int | None = None  # encoder-decoder: the decoder's first input (None = bos)
    # Head
    head: str | None = None
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    problem_type: str | None = None       # "regression" or "single_label_classification"
    classifier_dropout: float | None = None  # None = hidden_dropout
    name_or_path: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
            )
        if self.head not in HEADS:
            raise ConfigError(f"head {self.head!r} is not one of {[h for h in HEADS if h]}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads} "
                              "(each key/value head serves a whole group of query heads)")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary positions (they rotate pairs)")
        if self.is_encoder_decoder:
            if self.head not in (None, "causal-lm"):
                raise ConfigError(f"an encoder-decoder has no {self.head!r} head (it has causal-lm: next-token "
                                  "prediction in the decoder)")
            if self.num_decoder_layers is None:
                self.num_decoder_layers = self.num_layers
            if self.num_decoder_layers < 1:
                raise ConfigError(f"num_decoder_layers must be >= 1, got {self.num_decoder_layers}")
            if self.decoder_start_token_id is None:
                self.decoder_start_token_id = self.bos_token_id
        elif self.num_decoder_layers is not None:
            raise ConfigError(f"num_decoder_layers is for encoder-decoder models, not {self.model_type}")
        if self.scale_embedding is None:
            self.scale_embedding = self.is_encoder_decoder
        if self.pre_norm is None:
            self.pre_norm = self.causal
        if self.embedding_norm is None:
            # BERT normalises its embeddings; the original Transformer, post-norm too, does not
            self.embedding_norm = not self.pre_norm and not self.is_encoder_decoder
        if self.final_norm is None:
            self.final_norm = self.pre_norm
        for name in ("pre_norm", "embedding_norm", "final_norm", "linear_bias", "tie_word_embeddings",
                     "scale_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.ffn not in FFNS:
            raise ConfigError(f"ffn {self.ffn!r} is not one of {list(FFNS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm {self.norm!r} is not one of {list(NORMS)}")
        if self.position_embedding not in POSITIONS:
            raise ConfigError(f"position_embedding {self.position_embedding!r} is not one of {list(POSITIONS)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not one of {list(ACTIVATIONS)}")
        if self.head in ("nsp", "pretraining") and self.model_type != "bert":
            raise ConfigError(f"head {self.head!r} exists only for bert, not {self.model_type}")
        if self.head == "causal-lm" and not (self.causal or self.is_encoder_decoder):
            raise ConfigError(f"head 'causal-lm' needs a decoder ({', '.join(DECODERS + ENCODER_DECODERS)}), "
                              f"not {self.model_type}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    # Architecture facts follow from model_type; they are not stored twice.
    @property
    def causal(self) -> bool:
        return self.model_type in DECODERS

    @property
    def is_encoder_decoder(self) -> bool:
        return self.model_type in ENCODER_DECODERS

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from padding_idx + 1 (a fairseq legacy)."""
        return (self.pad_token_id + 1) if self.model_type == "roberta" else 0

    @property
    def has_pooler(self) -> bool:
        """BERT's tanh pooler over [CLS], kept where the Hugging Face class for this head has it."""
        if self.model_type == "bert":
            return self.head in (None, "nsp", "pretraining", "classification")
        return self.model_type == "roberta" and self.head is None

    @property
    def is_regression(self) -> bool:
        return self.head == "classification" and (
            self.problem_type == "regression" or (self.problem_type is None and self.num_labels == 1)
        )

    @property
    def labels(self) -> list[str]:
        if self.id2label:
            return [self.id2label[i] for i in range(self.num_labels)]
        return [f"LABEL_{i}" for i in range(self.num_labels)]

    def replace(self, **changes) -> "ModelConfig":
        # head_dim and num_kv_heads are stored resolved; one that only followed the head count or the
        # width is derived again, so replace(hidden_size=...) does not keep a stale head_dim
        if {"hidden_size", "num_heads"} & changes.keys():
            if "head_dim" not in changes and self.head_dim == self.hidden_size // self.num_heads:
                changes["head_dim"] = None
            if "num_kv_heads" not in changes and self.num_kv_heads == self.num_heads:
                changes["num_kv_heads"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
