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
from velotune.kernels.moe_reference import MOE_ACTIVATIONS, Experts, moe_experts_reference
from velotune.kernels.reference import (
    ACTIVATIONS,
    LowRank,
    add_rms_norm_reference,
    apply_rope_reference,
    glu_backward_inplace_reference,
    glu_low_rank_reference,
    glu_reference,
    linear_cross_entropy_reference,
    right_products_reference,
    rms_norm_reference,
    varlen_attention_reference,
)

__all__ = [
    "LowRank", "add_rms_norm", "apply_rope", "capturing", "force_triton", "glu", "glu_backward_inplace",
    "glu_low_rank", "kernels_enabled", "moe_experts",
    "linear_cross_entropy", "rms_norm", "set_kernels_enabled", "use_triton", "varlen_attention",
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


def glu_low_rank(gate: torch.Tensor, up: torch.Tensor, activation: str,
                 gate_term: LowRank | None = None, up_term: LowRank | None = None) -> torch.Tensor:
    """act(gate + gate_term) * (up + up_term) for 2-D gate and up [tokens, intermediate]: the fused
    LoRA MLP's forward GLU, with the gate and up adapters' terms added as the kernel reads its
    inputs (kernels/ops/glu_low_rank.py). Not differentiable (the MLP's backward is its own)."""
    if gate_term is None and up_term is None:
        return glu(gate, up, activation)
    _check_glu_operands("glu_low_rank", activation, gate, gate=gate, up=up)
    _check_terms("glu_low_rank", gate, gate_term=gate_term, up_term=up_term)
    if use_triton(gate, up):
        from velotune.kernels.ops.glu_low_rank import glu_low_rank_triton

        return glu_low_rank_triton(gate, up, activation == "gelu_pytorch_tanh", gate_term, up_term)
    return glu_low_rank_reference(gate, up, activation, gate_term, up_term)


def glu_backward_inplace(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str, *,
                         gate_term: LowRank | None = None, up_term: LowRank | None = None,
                         dh_term: LowRank | None = None, xa_grads_out: torch.Tensor | None = None) -> None:
    """GLU backward in the buffers it reads (the fused LoRA MLP's backward, where all three are
    dead after this), each first completed by its adapter's low-rank term when one is given:
    dh <- act(gate) * up, gate <- d/dgate, up <- d/dup. Same shape, dtype and device, contiguous.
    `xa_grads_out` [tokens, r_gate + r_up] (present terms only) also receives the gradients of the
    gate's and up's term inputs, s dgate right^T and s dup right^T (d(X A^T) of those adapters),
    computed as dgate and dup are written."""
    _check_glu_operands("glu_backward_inplace", activation, dh, gate=gate, up=up)
    if not (dh.is_contiguous() and gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("glu_backward_inplace: dh, gate and up must be contiguous (they are written in place)")
    terms = dict(gate_term=gate_term, up_term=up_term, dh_term=dh_term)
    _check_terms("glu_backward_inplace", gate, **terms)
    if xa_grads_out is not None:
        present = [t for t in (gate_term, up_term) if t is not None]
        if not present:
            raise ValueError("glu_backward_inplace: xa_grads_out needs a gate_term or an up_term")
        _check_product_target("glu_backward_inplace", "xa_grads_out", xa_grads_out, sum(t.xa.shape[1] for t in present),
                              like=gate)
    if use_triton(dh, gate, up):
        gelu_tanh = activation == "gelu_pytorch_tanh"
        if gate_term is None and up_term is None and dh_term is None:
            from velotune.kernels.ops.glu_inplace import glu_backward_inplace_triton

            glu_backward_inplace_triton(dh, gate, up, gelu_tanh)
        else:
            from velotune.kernels.ops.glu_low_rank import glu_low_rank_backward_inplace_triton

            glu_low_rank_backward_inplace_triton(dh, gate, up, gelu_tanh, gate_term, up_term, dh_term, xa_grads_out)
        return
    glu_backward_inplace_reference(dh, gate, up, activation, **terms)
    if xa_grads_out is not None:
        pairs = [(grad, t.right, t.scale) for grad, t in ((gate, gate_term), (up, up_term)) if t is not None]
        right_products_reference(pairs, xa_grads_out)


def _check_product_target(op: str, name: str, target: torch.Tensor, width: int, like: torch.Tensor) -> None:
    """A [rows, width] output of skinny products, its columns contiguous (rows may be strided)."""
    if target.dim() != 2 or target.shape[1] != width or target.stride(1) != 1:
        raise ValueError(f"{op}: {name} must be [rows, {width}] with contiguous columns, got "
                         f"{tuple(target.shape)} with strides {target.stride()}")
    if target.shape[0] != like.shape[0] or target.dtype != like.dtype or target.device != like.device:
        raise ValueError(f"{op}: {name} is {tuple(target.shape)} {target.dtype} on {target.device}, expected "
                         f"{like.shape[0]} rows of {like.dtype} on {like.device}")


def _check_glu_operands(op: str, activation: str, first: torch.Tensor, **others: torch.Tensor) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}, expected one of {ACTIVATIONS}")
    for name, t in others.items():
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} {t.dtype} {t.device} differs from "
                             f"{tuple(first.shape)} {first.dtype} {first.device}")


def _check_terms(op: str, like: torch.Tensor, **terms: LowRank | None) -> None:
    """Each term must be xa [rows, r] @ right [r, cols] in the operands' dtype and device."""
    if any(t is not None for t in terms.values()) and (like.dim() != 2 or not like.is_contiguous()):
        raise ValueError(f"{op}: with low-rank terms the operands must be 2-D and contiguous, got "
                         f"{tuple(like.shape)} with strides {like.stride()}")
    for name, term in terms.items():
        if term is None:
            continue
        xa, right = term.xa, term.right
        if xa.dim() != 2 or right.dim() != 2 or xa.shape[0] != like.shape[0] or right.shape[1] != like.shape[1] \
                or xa.shape[1] != right.shape[0]:
            raise ValueError(f"{op}: {name} is xa {tuple(xa.shape)} @ right {tuple(right.shape)}, expected "
                             f"[{like.shape[0]}, r] @ [r, {like.shape[1]}]")
        for part, t in (("xa", xa), ("right", right)):
            if t.dtype != like.dtype or t.device != like.device:
                raise ValueError(f"{op}: {name}.{part} is {t.dtype} on {t.device}, expected {like.dtype} on {like.device}")


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


def varlen_flash_supports(head_dim: int) -> bool:
    """Whether the variable-length flash kernel takes this head size (at most 256, a multiple of 8);
    other sizes run the reference, which reads the document offsets on the host."""
    return head_dim <= 256 and head_dim % 8 == 0


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scale: float, window: int | None = None, causal: bool = True) -> torch.Tensor:
    """Causal attention inside each packed document (no attention across them): q [N, Hq, D],
    k/v [N, Hk, D], cu_seqlens int32 [n + 1] the documents' start offsets and N; `max_len` bounds
    the longest document; `window` a sliding window (a query sees itself and window - 1 keys back).
    PyTorch's variable-length flash kernel on CUDA in half precision (kernels/ops/varlen_attention.py),
    the masked reference elsewhere. `causal=False` (no window): each segment attends both ways,
    as a vision tower's images and attention windows do."""
    if (q.is_cuda and kernels_enabled() and q.dtype in (torch.float16, torch.bfloat16)
            and varlen_flash_supports(q.shape[-1])):
        from velotune.kernels.ops.varlen_attention import varlen_attention_flash

        return varlen_attention_flash(q, k, v, cu_seqlens, max_len, scale, window, causal)
    return varlen_attention_reference(q, k, v, cu_seqlens, scale, window, causal)


def moe_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: Experts) -> torch.Tensor:
    """The experts' weighted sum for x [N, H] with each token's k choices (ids, weights [N, k]):
    token sort, grouped GEMMs over the experts, weighted un-permute, with a hand-written backward
    (kernels/ops/moe.py) on CUDA; `moe_experts_reference` elsewhere."""
    if experts.activation not in MOE_ACTIVATIONS:
        raise ValueError(f"moe_experts: unknown activation {experts.activation!r}, expected one of {MOE_ACTIVATIONS}")
    if use_triton(x):
        from velotune.kernels.ops.moe import moe_experts_triton

        return moe_experts_triton(x, expert_ids, weights, experts)
    return moe_experts_reference(x, expert_ids, weights, experts)
