"""Cross-entropy of a linear output head without materialising the [N, V] logits.

Design (the fused approach of Liger-Kernel / Unsloth, written from the maths):
- Tokens are processed in chunks. Per chunk: logits = h_c @ W.T in the input dtype (a [C, V]
  buffer), then one Triton program per token computes the log-sum-exp over the vocabulary in
  blocks (online max/sum, so any V fits) and overwrites that logits row with d loss / d logits
  = softmax - onehot (times the soft-cap slope 1 - tanh^2 for Gemma 2). Two matmuls turn that
  into the chunk's gradient w.r.t. hidden (written into a [N, H] buffer) and its contribution to
  the gradient w.r.t. the weight (accumulated in float32, then rounded once to W's dtype).
- So the gradients are complete when the forward returns; the backward only scales them by the
  incoming gradient of the summed loss. Peak extra memory is one chunk of logits, one buffer
  reused by every chunk (about 256 MiB: measured on an H100 at Llama-3 sizes, smaller chunks
  starve the matmuls of rows, 128-token chunks ran 4x slower) plus the gradient buffers,
  instead of N x V logits in several dtypes.
- Gradients that nobody needs are not computed: a frozen head (LoRA) skips the weight gradient,
  and outside autograd only the loss is computed.
- The loss is a float32 sum over target tokens with their count (labels != ignore_index), so the
  trainer can divide by the token count of a whole optimizer step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels.dispatch import capturing
from velotune.kernels.float32_sum import add_matmul_float32
from velotune.kernels.ops.launch import check_label_range, check_same_device, on_device
from velotune.kernels.ops.triton_math import tanh

_MAX_BLOCK_V = 4096
_CHUNK_LOGITS_BYTES = 256 * 2**20


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def _cross_entropy_rows_kernel(
    LOGITS, logits_stride, LABELS, LOSS, n_vocab, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * logits_stride
    label = tl.load(LABELS + row)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(base + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(LOGITS.dtype.element_ty),
                         mask=cols < n_vocab)
        return
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_vocab
        z = _capped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = _capped(tl.load(base + label).to(tl.float32), softcap, HAS_SOFTCAP)
    tl.store(LOSS + row, lse - target)
    if COMPUTE_GRAD:
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_vocab
            z = _capped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            grad = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            if HAS_SOFTCAP:
                capped_over_cap = z / softcap
                grad = grad * (1.0 - capped_over_cap * capped_over_cap)
            tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def default_chunk_size(vocab: int, element_size: int) -> int:
    """Tokens per chunk such that a chunk's logits take about `_CHUNK_LOGITS_BYTES`, rounded down
    to a multiple of 128 rows (the matmul tile) when that many fit."""
    rows = max(1, _CHUNK_LOGITS_BYTES // (vocab * element_size))
    return rows - rows % 128 if rows >= 128 else rows


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be [N, H] and weight "
                         f"{tuple(weight.shape)} [V, H] with the same H")
    if labels.shape != hidden.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} {labels.dtype} must be an integer "
                         f"tensor of shape ({hidden.shape[0]},)")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if not capturing(labels):  # no host sync in a CUDA graph: the graphed step checks labels before its copy
        check_label_range(labels, weight.shape[0], ignore_index, "linear_cross_entropy")


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                ignore_index: int, chunk_size: int):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
        # One logits buffer for every chunk: `logits = h @ W^T` in the loop would allocate the
        # next chunk while the name still holds the last one, two chunks (512 MiB) at the peak.
        buffer = torch.empty(min(chunk_size, n_tokens), vocab, dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h = hidden[start:end]
            logits = torch.mm(h, weight.t(), out=buffer[:end - start])
            with on_device(hidden):
                _cross_entropy_rows_kernel[(end - start,)](
                    logits, logits.stride(0), labels[start:end], losses[start:end], vocab, ignore_index,
                    float(softcap or 0.0), HAS_SOFTCAP=bool(softcap), COMPUTE_GRAD=need_hidden or need_weight,
                    BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
                )
            if need_hidden:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            if need_weight:
                add_matmul_float32(grad_weight, logits.t(), h)
        ctx.grad_hidden = grad_hidden
        ctx.grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        n_targets = (labels != ignore_index).sum()
        ctx.mark_non_differentiable(n_targets)
        return losses.sum(), n_targets

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_count: torch.Tensor | None):
        if ctx.grad_hidden is None and ctx.grad_weight is None and any(ctx.needs_input_grad[:2]):
            raise RuntimeError("linear_cross_entropy: backward ran twice over the same graph; its gradients are "
                               "computed in the forward and consumed by the first backward")
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                softcap: float | None = None, ignore_index: int = -100,
                                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and target count; `chunk_size` (tokens per chunk) defaults to
    `default_chunk_size`."""
    _check(hidden, weight, labels, ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], hidden.element_size())
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    return LinearCrossEntropyFunction.apply(hidden, weight, labels.contiguous(), softcap, ignore_index, chunk_size)
