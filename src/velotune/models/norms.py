"""RMSNorm as a module, shared by the decoder (models/transformer.py) and the vision towers that
use it (models/vision.py: Qwen2.5-VL's blocks and patch merger); the arithmetic is
`kernels.rms_norm` (Triton on a GPU, the reference on the CPU)."""
from __future__ import annotations

import torch
from torch import nn

from velotune import kernels


class RMSNorm(nn.Module):
    """x / rms(x) scaled by (offset + w) over the last dimension (offset 1: Gemma's (1 + w))."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        # Gemma stores w and scales by (1 + w): its neutral weight is zero.
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.offset)

    def add_and_normalize(self, residual: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + delta), residual + delta) in one pass (`kernels.add_rms_norm`): a
        residual add fused with the norm that reads its sum. No delta: (norm(residual), residual)."""
        if delta is None:
            return self(residual), residual
        return kernels.add_rms_norm(delta, residual, self.weight, self.eps, self.offset)
