"""One dataclass configures every model: the trunk (BERT, RoBERTa, GPT-2) and its head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lmforge.errors import ConfigError

MODEL_TYPES = ("bert", "roberta", "gpt2")
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
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass
class ModelConfig:
    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2              # 0 = no token-type embeddings (GPT-2)
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1           # after each sublayer, before the residual add
    attention_dropout: float = 0.1        # on the attention probabilities
    embedding_dropout: float | None = None  # None = hidden_dropout (GPT-2 has its own embd_pdrop)
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = True
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
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not one of {list(ACTIVATIONS)}")
        if self.head in ("nsp", "pretraining") and self.model_type != "bert":
            raise ConfigError(f"head {self.head!r} exists only for bert, not {self.model_type}")
        if self.head == "causal-lm" and self.model_type != "gpt2":
            raise ConfigError(f"head 'causal-lm' needs a decoder (gpt2), not {self.model_type}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    # Architecture facts follow from model_type; they are not stored twice.
    @property
    def causal(self) -> bool:
        return self.model_type == "gpt2"

    @property
    def pre_norm(self) -> bool:
        """GPT-2 normalises before each sublayer (and at the end); BERT after each residual add."""
        return self.model_type == "gpt2"

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers positions from padding_idx + 1 (a fairseq legacy)."""
        return (self.pad_token_id + 1) if self.model_type == "roberta" else 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

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
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
