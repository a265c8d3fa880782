"""Rotary position embedding of q and k together, as one Triton kernel launch per direction.

Layout: q [B, Hq, T, D] and k [B, Hk, T, D] with any strides over (B, H, T) (the model passes
transposed views of the projections) and a contiguous last dim; cos/sin [B, T, R] (or [1, T, R],
broadcast over the batch), R even and <= D: the first R dims rotate in the rotate-half convention,
the remaining D - R pass through (partial rotary). Positions arrive only through cos/sin, so
packed sequences whose positions restart need nothing special.

One program handles one (batch, token) pair: it loads that token's cos/sin once and rotates
every q and k head with them. The backward is the same kernel rotating the incoming gradient by
-sin. Where autograd is not recording (inference, generation) q and k are rotated in place and
returned, saving an allocation per layer; while it records, the result goes to new tensors,
because autograd forbids a two-output Function from modifying views (which q and k are) in place.
cos and sin get no gradient: they are constants computed from position ids.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels.ops.launch import check_same_device, on_device


@triton.jit
def _rotate_heads(
    X, x_sb, x_sh, x_st, O, o_sb, o_sh, o_st, b, t, n_heads, half, tail, c1, c2, s1, s2,
    BACKWARD: tl.constexpr, COPY_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < half)
    src = X + b * x_sb + t * x_st + heads * x_sh
    dst = O + b * o_sb + t * o_st + heads * o_sh
    x1 = tl.load(src + dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + dims, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose of the forward rotation
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(dst + dims, o1.to(O.dtype.element_ty), mask=mask)
    tl.store(dst + half + dims, o2.to(O.dtype.element_ty), mask=mask)
    if COPY_TAIL:
        tail_dims = tl.arange(0, BLOCK_TAIL)[None, :]
        tail_mask = (heads < n_heads) & (tail_dims < tail)
        kept = tl.load(src + 2 * half + tail_dims, mask=tail_mask, other=0.0)
        tl.store(dst + 2 * half + tail_dims, kept, mask=tail_mask)


@triton.jit
def _rope_kernel(
    Q, q_sb, q_sh, q_st, QO, qo_sb, qo_sh, qo_st,
    K, k_sb, k_sh, k_st, KO, ko_sb, ko_sh, ko_st,
    COS, SIN, cs_sb, cs_st, n_tokens, n_q_heads, n_k_heads, half, tail,
    BACKWARD: tl.constexpr, COPY_TAIL: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tokens
    t = pid % n_tokens
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < half
    cs = b * cs_sb + t * cs_st
    c1 = tl.load(COS + cs + dims, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs + half + dims, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs + dims, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs + half + dims, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(Q, q_sb, q_sh, q_st, QO, qo_sb, qo_sh, qo_st, b, t, n_q_heads, half, tail, c1, c2, s1, s2,
                  BACKWARD, COPY_TAIL, BLOCK_QH, BLOCK_HALF, BLOCK_TAIL)
    _rotate_heads(K, k_sb, k_sh, k_st, KO, ko_sb, ko_sh, ko_st, b, t, n_k_heads, half, tail, c1, c2, s1, s2,
                  BACKWARD, COPY_TAIL, BLOCK_KH, BLOCK_HALF, BLOCK_TAIL)


def _launch(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor,
            cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    batch, n_q, tokens, dim = q.shape
    rot = cos.shape[-1]
    half, tail = rot // 2, dim - rot
    batch_stride = cos.stride(0) if cos.shape[0] > 1 else 0
    with on_device(q):
        _rope_kernel[(batch * tokens,)](
            q, q.stride(0), q.stride(1), q.stride(2), q_out, q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k, k.stride(0), k.stride(1), k.stride(2), k_out, k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos, sin, batch_stride, cos.stride(1), tokens, n_q, k.shape[1], half, tail,
            BACKWARD=backward, COPY_TAIL=tail > 0 and q_out.data_ptr() != q.data_ptr(),
            BLOCK_QH=triton.next_power_of_2(n_q), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(max(half, 1)), BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)),
        )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _launch(q, k, q_out, k_out, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk = _last_dim_contiguous(dq), _last_dim_contiguous(dk)
        dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
        _launch(dq, dk, dq_in, dk_in, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T, D]")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, tokens or head dim")
    batch, _, tokens, dim = q.shape
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != tokens:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
                         f"[{batch} or 1, {tokens}, R]")
    rot = cos.shape[-1]
    if rot % 2 or rot > dim:
        raise ValueError(f"apply_rope: rotary dim R={rot} (last dim of cos/sin) must be even and <= head dim {dim}")
    if q.dtype != k.dtype:
        raise ValueError(f"apply_rope: q is {q.dtype} but k is {k.dtype}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope: the Triton path gives cos/sin no gradient; detach them")
    check_same_device(q=q, k=k, cos=cos, sin=sin)


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, cos, sin)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return RopeFunction.apply(q, k, cos, sin)
    _launch(q, k, q, k, cos, sin, backward=False)
    return q, k
