"""Causal attention over packed documents, through PyTorch's own variable-length flash kernel.

Why: a padding-free micro-batch (the rows of a micro-batch laid end to end in one sequence, see
`data/batching.py:collate_flat`) needs attention that stops at every document boundary. A boolean
[tokens x tokens] mask would send SDPA to its memory-efficient kernel (grouped-query heads
repeated, and the whole square computed), while flash attention's variable-length form takes the
documents' start offsets (`cu_seqlens`) and computes only each document's own causal triangle.
It is PyTorch's kernel (`aten._flash_attention_forward/_backward`), not ours: the public wrapper
`torch.nn.attention.varlen.varlen_attn` changed its arguments between torch 2.11 and 2.13, so the
two aten operators, whose schemas both versions share, are called here with a hand-written
autograd Function.

What a CUDA graph needs holds: `max_len` is a host integer fixed per captured shape (an upper bound
on any document's length is allowed), `cu_seqlens` is a device tensor of fixed length (documents
of length zero, a repeated final offset, fill unused slots), and nothing waits for the GPU.
Grouped-query heads are passed as they are (flash reads each key/value head once per group).
"""
from __future__ import annotations

import torch


def _window_sizes(window: int | None, causal: bool) -> tuple[int, int]:
    """flash's (left, right) reach: for a causal layer a query at i sees keys i-left .. i; a
    two-way one (a vision tower) sees its whole segment."""
    if not causal:
        return -1, -1
    return (-1 if window is None else window - 1), 0


class VarlenFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_len: int, scale: float, window: int | None, causal: bool) -> torch.Tensor:
        left, right = _window_sizes(window, causal)
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, causal, False,
            scale=scale, window_size_left=left, window_size_right=right)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_len, ctx.scale, ctx.window, ctx.causal = max_len, scale, window, causal
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        left, right = _window_sizes(ctx.window, ctx.causal)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_len, ctx.max_len, 0.0, ctx.causal,
            rng_state, unused, scale=ctx.scale, window_size_left=left, window_size_right=right)
        return dq, dk, dv, None, None, None, None, None


def varlen_attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_len: int, scale: float, window: int | None, causal: bool = True) -> torch.Tensor:
    """q [N, Hq, D], k and v [N, Hk, D] (N tokens of all documents), cu_seqlens int32 [n + 1]."""
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    return VarlenFlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_len,
                                      scale, window, causal)
