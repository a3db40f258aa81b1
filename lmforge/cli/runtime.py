"""--device and --precision for the commands that run a model, resolved once and said on stderr."""

from __future__ import annotations

import sys

from lmforge.kernels.precision import DEVICES, PRECISIONS


def add_runtime_args(p) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 compute where the hardware has it (AMX, AVX512_BF16, CUDA), else fp32; "
                        "`lmforge env` says which")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when available, else cpu")


def resolve_runtime(args, quiet: bool = False):
    """(device, Precision) from the parsed options. An int8 base (--quantize int8) computes its
    GEMMs in int8; `auto` then keeps the rest in fp32."""
    from lmforge.kernels.precision import resolve

    device, precision = resolve(args.device, args.precision, int8=bool(getattr(args, "quantize", None)))
    if not quiet:
        print(f"device {device}, precision {precision}", file=sys.stderr, flush=True)
    return device, precision
