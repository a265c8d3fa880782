"""Matmul products summed over chunks in float32.

Why: a gradient computed chunk by chunk (the fused cross-entropy's weight gradient over token
chunks, the fused MLP's down-adapter A gradient over row chunks) would be rounded to bf16 once per
chunk if each partial product were added in the inputs' dtype; one GEMM over all rows rounds once.
Keeping the running sum in float32 and rounding at the end matches the single GEMM's numerics.
"""
from __future__ import annotations

import torch


def add_matmul_float32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 `acc`, without a temporary of the product in a's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # half-precision CPU matmuls have no float32-output variant (CPU tests only)
        acc.addmm_(a.float(), b.float())
