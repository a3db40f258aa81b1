"""nn.Linear whose GEMM is the kernel chosen for this machine (lmforge.kernels.linear).

Parameter names, state dicts and `isinstance(m, nn.Linear)` are those of nn.Linear; the output is
x W^T + b whichever kernel computes it (plain F.linear, or oneDNN on a prepacked weight where that
was measured faster on this CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge import kernels


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)
