"""Architectures, heads and checkpoint I/O. Knows nothing of data, training or serving."""

from lmforge.models.checkpoint import from_pretrained, load_config, save_pretrained
from lmforge.models.config import ModelConfig
from lmforge.models.generate import generate
from lmforge.models.kv_cache import KVCache
from lmforge.models.model import Model, ModelOutput

__all__ = ["KVCache", "Model", "ModelConfig", "ModelOutput", "from_pretrained", "generate",
           "load_config", "save_pretrained"]
