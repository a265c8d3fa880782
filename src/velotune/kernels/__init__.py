"""The operations the model calls, behind one dispatch layer.

Each function here picks an implementation: the Triton kernel on CUDA when Triton is present and
kernels are enabled, the plain-PyTorch reference otherwise (the CPU path, and the oracle the
kernel tests compare against). The model calls only these functions, so the CPU path and the
fast path run the same model code.

Switches (see `velotune.kernels.dispatch`):
- `VELOTUNE_KERNELS=0` in the environment, or `set_kernels_enabled(False)`, turns the kernels off.
- `with force_triton():` runs the kernels on CPU tensors too; only meaningful under Triton's
  interpreter (`TRITON_INTERPRET=1` set before the first kernel runs), which the tests use.

Layout: `reference.py` holds the PyTorch references; `ops/` one module per op (`rms_norm`, `rope`,
`glu`, `glu_inplace`, `linear_cross_entropy`), each with its Triton kernels and, where the op is
differentiable, a `torch.autograd.Function` with a hand-written backward; they import Triton, so
they are imported only when a call takes the Triton path.
"""
from __future__ import annotations

import torch

from velotune.kernels.dispatch import capturing, force_triton, kernels_enabled, set_kernels_enabled, use_triton
from velotune.kernels.reference import (
    ACTIVATIONS,
    add_rms_norm_reference,
    apply_rope_reference,
    glu_backward_inplace_reference,
    glu_reference,
    linear_cross_entropy_reference,
    rms_norm_reference,
)

__all__ = [
    "add_rms_norm", "apply_rope", "capturing", "force_triton", "glu", "glu_backward_inplace", "kernels_enabled",
    "linear_cross_entropy", "rms_norm", "set_kernels_enabled", "use_triton",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim, scaled by (offset + weight); Gemma uses offset 1."""
    if use_triton(x, weight):
        from velotune.kernels.ops.rms_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, offset)
    return rms_norm_reference(x, weight, eps, offset)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass: the residual add of a pre-norm block
    fused with the next norm. Under autocast the block output x is bf16 while the residual stream
    stays float32: x is then cast to the residual's dtype, as the unfused add would promote it."""
    if x.dtype != residual.dtype:
        x = x.to(residual.dtype)
    if use_triton(x, residual, weight):
        from velotune.kernels.ops.rms_norm import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps, offset)
    return add_rms_norm_reference(x, residual, weight, eps, offset)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, T, D] and k [B, Hk, T, D] with cos/sin [B, T, R], R <= D
    (the first R dims rotate: partial rotary), rotate-half convention.

    On the Triton path, when autograd is not recording (inference, generation), q and k are
    rotated in place and returned: callers must not reuse the unrotated tensors."""
    if use_triton(q, k, cos, sin):
        from velotune.kernels.ops.rope import apply_rope_triton

        return apply_rope_triton(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, act = silu (SwiGLU) or gelu_pytorch_tanh (GeGLU-tanh)."""
    if use_triton(gate, up):
        from velotune.kernels.ops.glu import glu_triton

        return glu_triton(gate, up, activation)
    return glu_reference(gate, up, activation)


def glu_backward_inplace(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    """GLU backward in the buffers it reads (the fused LoRA MLP's backward, where all three are
    dead after this): dh <- act(gate) * up, gate <- d/dgate, up <- d/dup. Same shape, dtype and
    device, contiguous."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu_backward_inplace: unknown activation {activation!r}, expected one of {ACTIVATIONS}")
    for name, t in (("gate", gate), ("up", up)):
        if t.shape != dh.shape or t.dtype != dh.dtype or t.device != dh.device:
            raise ValueError(f"glu_backward_inplace: {name} {tuple(t.shape)} {t.dtype} {t.device} differs from "
                             f"dh {tuple(dh.shape)} {dh.dtype} {dh.device}")
    if not (dh.is_contiguous() and gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("glu_backward_inplace: dh, gate and up must be contiguous (they are written in place)")
    if use_triton(dh, gate, up):
        from velotune.kernels.ops.glu_inplace import glu_backward_inplace_triton

        glu_backward_inplace_triton(dh, gate, up, activation == "gelu_pytorch_tanh")
        return
    glu_backward_inplace_reference(dh, gate, up, activation)


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
    of a whole optimizer step, which makes gradient accumulation exact. The Triton path never
    materialises the [N, V] logits; it computes the gradients during the forward. Mixed dtypes
    (bf16 hidden states under autocast, a float32 trainable head) compute in the hidden states'
    dtype, as autocast's matmul would; the head's gradient flows back through the cast."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # The op manages its own precision: feed it autocast's matmul dtype, then run it with
        # autocast off so its float32 accumulators are not cast down behind its back.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels,
                                        softcap=softcap, ignore_index=ignore_index)
    if weight.dtype != hidden.dtype and hidden.dtype in (torch.float16, torch.bfloat16):
        weight = weight.to(hidden.dtype)
    if use_triton(hidden, weight, labels):
        from velotune.kernels.ops.linear_cross_entropy import linear_cross_entropy_triton

        return linear_cross_entropy_triton(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index)
    return linear_cross_entropy_reference(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index)
