"""Dynamic int8 quantization for inference: the frozen base model's Linear layers hold int8 weights
(per-channel scales) and quantize their inputs on the fly; LoRA A/B, bottleneck adapters and the
task heads stay in fp32 (they are tiny, and adapters must stay exact and hot-swappable).

Measured in benchmarks/speed.py (speed-up and the SST-2 dev accuracy change).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lmforge.errors import ConfigError

_SKIP = ("lora_A", "lora_B", "adapters", "adapter_heads")


def quantizable(model: nn.Module) -> list[str]:
    """Names of the base model's nn.Linear modules inside the trunk (not adapters, not heads)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("transformer.layers.")
            and not any(part in _SKIP for part in name.split("."))]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize in place and return the model (CPU only; merging adapters is refused afterwards)."""
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError("--quantize int8 is a CPU feature (dynamic int8 kernels); the model is on "
                          f"{next(model.parameters()).device}")
    names = quantizable(model)
    if not names:
        raise ConfigError("no Linear layers to quantize in this model")
    for name in names:  # torch's dynamic quantization maps exact nn.Linear types
        model.get_submodule(name).__class__ = nn.Linear
    with warnings.catch_warnings():  # torch.ao eager quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, {n: default_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)
    model.__dict__["quantized"] = "int8"
    return model.eval()
