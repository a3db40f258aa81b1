"""Dynamic int8 quantization for inference: the frozen base model's Linear layers hold int8 weights
(one scale per output channel) and quantize their inputs on the fly (one scale per token); LoRA A/B,
bottleneck adapters and the task heads stay in fp32 (they are tiny, and adapters must stay exact and
hot-swappable).

Every projection of the trunk is int8 by default. Three choices keep that accurate: input scales per
token (kernels/int8.py), weight scales per output channel (one scale per tensor lost 1.1 to 2.1 points
of SST-2 dev accuracy on three fine-tuned models with the FFN output in int8), and inputs in all 8
bits where the CPU has VNNI (torch's dynamic Linear keeps 7): the post-GELU inputs of the FFN output
have outlier channels, about 14x the median. `benchmarks/int8.py` measures the cost over every
fine-tuned SST-2 model. `keep_fp32=("output",)` keeps the FFN output in fp32.

The int8 kernel itself (Int8Linear, and Q/K/V as one int8 GEMM) is kernels/int8.py's: weights are
prepacked for oneDNN where this torch has it (on this VNNI machine its dynamic int8 GEMMs beat
fbgemm's at these sizes). This file decides which layers of a model become int8.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.kernels import int8
from lmforge.kernels.int8 import Int8Linear, prepack_engine  # noqa: F401  (prepack_engine: benchmarks)

_SKIP = ("lora_A", "lora_B", "adapters", "adapter_heads")


# Layer paths left fp32 unless asked: ("output",) would be the FFN output (not attention.output).
KEEP_FP32: tuple[str, ...] = ()


def _layer_path(name: str) -> str:
    """transformer.layers.3.attention.query.base -> attention.query"""
    parts = [p for p in name.split(".")[3:] if p != "base"]
    return ".".join(parts)


def quantizable(model: nn.Module, keep_fp32: tuple[str, ...] = ()) -> list[str]:
    """Names of the base model's nn.Linear modules inside the trunk (not adapters, not heads, not the
    layer paths in keep_fp32)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("transformer.layers.")
            and not any(part in _SKIP for part in name.split("."))
            and _layer_path(name) not in keep_fp32]


def quantize_int8(model: nn.Module, keep_fp32: tuple[str, ...] = KEEP_FP32) -> nn.Module:
    """Quantize in place and return the model (CPU only; merging adapters is refused afterwards)."""
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError("--quantize int8 is a CPU feature (dynamic int8 kernels); the model is on "
                          f"{next(model.parameters()).device}")
    if not int8.available():
        raise ConfigError(f"--quantize int8: this torch ({torch.__version__}) has no dynamic int8 kernels")
    names = quantizable(model, keep_fp32)
    if not names:
        raise ConfigError("no Linear layers to quantize in this model")
    # Where Q, K and V all become int8, kernels.stacked_linear runs them as one int8 GEMM by itself.
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8Linear(model.get_submodule(name)))
    model.__dict__["quantized"] = "int8"
    return model.eval()


QUANTIZE_CHOICES = ("int8",)


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """`--quantize KIND` of `lmforge evaluate / predict / embed` (Classifier, Embedder)."""
    if kind != "int8":
        raise ConfigError(f"--quantize: unknown kind {kind!r} (expected one of {', '.join(QUANTIZE_CHOICES)})")
    return quantize_int8(model)
