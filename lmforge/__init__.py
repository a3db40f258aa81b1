"""lmforge: pre-train, adapt, align and serve Transformer language models."""

from lmforge.models import Model, ModelConfig, from_pretrained, generate, save_pretrained

__version__ = "0.1.0"
__all__ = ["Model", "ModelConfig", "from_pretrained", "generate", "save_pretrained", "load_tokenizer"]


def load_tokenizer(name_or_path):
    """The tokenizer of a model directory or alias (see lmforge.data.tokenizer)."""
    from lmforge.data.tokenizer import load_tokenizer as _load

    return _load(name_or_path)
