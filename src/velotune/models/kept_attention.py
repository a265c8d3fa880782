"""A checkpointed layer's attention output kept from the forward, so its recomputation in the
backward skips the attention kernel.

At long lengths attention is most of a step: its forward is 2 x heads x head_dim x T^2 FLOP per
layer (causal), and with whole layers checkpointed it runs three times' worth in the step's
attention work of 4.5 forwards (forward, recomputation, backward 2.5). Keeping what the flash
backward reads besides q, k and v, the output and its log-sum-exp (2 B x q + 4 B x heads per
token, as much as the layer input for Llama-3.1-8B), takes the recomputation's kernel out: 3.5
forwards' worth instead of 4.5. q, k and v are still recomputed (matmuls, cheap at these lengths).
The output is parked in pinned host memory beside the layer's input, in the same offload group
(`LayerInputOffloader.park`), so it comes back with the input, prefetched one layer ahead; which
layers keep theirs is the placement plan's choice (`velotune.placement`: host room left after the
inputs, GPU room for one more layer's output in flight).

`flash_attention` is the attention of such a layer: an autograd Function around the flash kernel
(`aten._scaled_dot_product_flash_attention` on CUDA, its CPU twin elsewhere, grouped-query heads
read in place) with the kernel's own backward. In the layer's first forward it parks the output;
in the recomputation (`checkpointing.recomputing()`) it returns the parked output instead of
running the kernel. Both passes save the same tensors (q, k, v, output, log-sum-exp), which is
what torch's non-reentrant checkpoint matches between them.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from velotune.models.offload import LayerInputOffloader


class KeptAttention:
    """One layer's parked attention output and log-sum-exp for one forward."""

    __slots__ = ("offloader", "parked", "extra", "flipped")

    def __init__(self, offloader: LayerInputOffloader) -> None:
        self.offloader = offloader
        self.parked: tuple | None = None
        self.extra: tuple | None = None   # the CUDA kernel's small outputs its backward takes back
        self.flipped = False

    def keep(self, out: torch.Tensor, lse: torch.Tensor, extra: tuple | None) -> None:
        # The CUDA kernel writes [B, H, T, D] in [B, T, H, D] memory order: parked in that order,
        # it comes back with the same strides, so the output projection reads it without a copy.
        self.flipped = out.transpose(1, 2).is_contiguous()
        self.parked = (self.offloader.park(out.transpose(1, 2) if self.flipped else out), self.offloader.park(lse))
        self.extra = extra

    def take(self) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        out, lse = self.parked
        self.parked = None          # the recomputation holds them from here; the buffers go back
        out = self.offloader.fetch(out)
        return (out.transpose(1, 2) if self.flipped else out), self.offloader.fetch(lse), self.extra


class _Current(threading.local):
    # Thread-local: the recomputation runs in whichever thread runs the backward.
    kept: KeptAttention | None = None


_CURRENT = _Current()


def current() -> KeptAttention | None:
    """The keeper of the layer being run (forward or recomputation), if it keeps its attention."""
    return _CURRENT.kept


@contextmanager
def keeping(kept: KeptAttention | None) -> Iterator[None]:
    outer, _CURRENT.kept = _CURRENT.kept, kept
    try:
        yield
    finally:
        _CURRENT.kept = outer


def with_kept_attention(layer: Callable[..., torch.Tensor], kept: KeptAttention) -> Callable[..., torch.Tensor]:
    """`layer`, running every call (the forward and torch's recomputation) with `kept` current."""
    def run(*args, **kwargs) -> torch.Tensor:
        with keeping(kept):
            return layer(*args, **kwargs)
    return run


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None):
    """(output, log-sum-exp, what the CUDA backward needs besides) of causal flash attention;
    q [B, H, T, D], k and v [B, Hkv, T, D]."""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, None


class FlashAttention(torch.autograd.Function):
    """Causal flash attention that parks its output in the forward and takes it back, instead of
    running the kernel, in a checkpoint's recomputation (see the module docstring)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,  # type: ignore[override]
                kept: KeptAttention) -> torch.Tensor:
        from velotune.models.checkpointing import recomputing

        if recomputing() and kept.parked is not None:
            out, lse, extra = kept.take()
        else:
            out, lse, extra = _forward(q, k, v, scale)
            if not recomputing():
                kept.keep(out, lse, extra)
        ctx.scale, ctx.extra = scale, extra
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        if q.is_cuda:
            cum_q, cum_k, max_q, max_k, seed, offset = ctx.extra
            # (the kernel reads [B, T, H, D] memory order, as the output projection's gradient
            # arrives: only a last dimension that is not contiguous needs a copy)
            grad = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=ctx.scale)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, True, scale=ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                    kept: KeptAttention) -> torch.Tensor:
    """Causal attention [B, H, T, D] whose output `kept` parks (see the module docstring)."""
    return FlashAttention.apply(q, k, v, scale, kept)
