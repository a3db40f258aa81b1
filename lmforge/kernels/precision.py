"""--device and --precision: what `auto` means on this machine, and the context that applies it.

bf16 compute is torch.autocast: weights, their gradients and the optimizer state stay fp32 (master
weights); matrix multiplies and attention run in bf16. `auto` picks it where the hardware multiplies
bf16 natively (AMX or AVX512_BF16 on CPUs; CUDA devices that support bf16) and fp32 elsewhere, where
bf16 would be emulated and slower.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError
from lmforge.kernels import machine

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"--device {name!r}: expected one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}, "
                          f"built with CUDA {torch.version.cuda or 'none'})")
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    name: str            # fp32 | bf16
    why: str             # one line for the run's log and run.json

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, device: torch.device):
        """The context every forward (and its backward) runs under."""
        if self.name == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __str__(self) -> str:
        return f"{self.name} ({self.why})"


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name not in PRECISIONS:
        raise ConfigError(f"--precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        hw = f"{torch.cuda.get_device_name(device)} {'supports' if native else 'lacks'} bf16"
    else:
        native = machine.has_bf16()
        hw = "this CPU has " + ("AMX" if machine.has_amx() else "AVX512_BF16") if native else \
            "this CPU has no bf16 instructions (AMX / AVX512_BF16)"
        if machine.isa_cap():   # the flags are those the cap leaves to oneDNN
            hw += f" under ONEDNN_MAX_CPU_ISA={machine.isa_cap()}"
    if name == "auto":
        return Precision("bf16" if native else "fp32", f"auto: {hw}")
    if name == "bf16" and not native:
        return Precision("bf16", f"asked for; {hw}, so bf16 is emulated and slower than fp32")
    return Precision(name, "asked for")


def resolve(device: str = "auto", precision: str = "auto", int8: bool = False) -> tuple[torch.device, Precision]:
    """(device, Precision) for a run. An int8 base (--quantize int8) computes its GEMMs in int8;
    `auto` then keeps the rest in fp32 (bf16 autocast around int8 GEMMs would only add casts)."""
    dev = resolve_device(device)
    if int8 and precision == "auto":
        return dev, Precision("fp32", "auto: the base model is int8")
    return dev, resolve_precision(precision, dev)
