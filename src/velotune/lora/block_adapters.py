"""The adapters of a fused LoRA block (`lora.fused`) as one tensor: where each A and B lies in
it, how it is made, and the views that carve the matrices (or their gradients) out of it.

Why one tensor: the fused Functions compute in one dtype (bf16 on a GPU) while the adapters are
float32, as PEFT keeps them. Cast one by one, the seven adapters of a decoder layer took 14 casts
and 2 concatenations (the stacked A matrices) in its forward, the same again in a checkpoint's
recomputation, and 14 casts of their gradients back to float32 in the backward: 46 of the 127
operations that launched a kernel in one layer's training step (benchmarks/op_census.py, toy
Llama-3.1-8B, 2026-12-07), where the eager 8B step at micro-batch 1 waits on the host that queues
its kernels (338 ms against 180 ms replayed from a CUDA graph, on an H100). Flattened,
concatenated and cast at once, a block's adapters cost one concatenation and one cast in the
forward, the same in the recomputation, and one gradient cast: 6 + 6 + 3 per layer of three
blocks (95 launches per layer in all). Autograd splits the float32 gradient back into the
matrices as views (no copies), so each adapter's `.grad` is a view of its block's buffer. Each
block also saves 1 tensor for its adapters instead of up to 4 (fewer checkpoint hooks run).
In float32 (adapters already in the compute dtype) the concatenation is a copy the per-matrix
path did not make for B and lone A matrices: one block's adapters, small beside its activations.

Layout: the A matrices in projection order, then the B matrices, each row-major. The A matrices of
the block's first `shared` projections (those reading one input: q, k and v; gate and up) follow
each other, so their stack [sum r, in] is one view, read once by X·A^T. Every other matrix, and
that stack, starts on a multiple of `ALIGN` elements, with unwritten padding before it where
needed; real models need none (their ranks and widths make every matrix a multiple of it).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors
from torch.autograd.function import once_differentiable

from velotune.lora.layers import LoraLinear
from velotune.quant.linear4bit import Linear4bit

# Where each matrix (or stack) starts: a multiple of this many elements, 256 bytes in bf16. A
# GEMM operand or output starting there is aligned as a tensor of its own would be, as far as
# cuBLAS (which looks at up to 256 bytes) and the CPU BLAS look, so they pick the kernels they
# pick for separate tensors: the same results, bit for bit (a product written at a 4-byte offset
# on the CPU came out different in its last bits).
ALIGN = 128


class Projection(NamedTuple):
    """What the Functions need to know about one projection besides its tensors (a named tuple:
    made for every block on every call, where a frozen dataclass took twice as long)."""

    out_features: int
    adapted: bool                    # an active adapter adds s * (X A^T) B^T
    scale: float                     # its s (alpha / r, or alpha / sqrt(r))
    rank: int
    quantized: Linear4bit | None     # a 4-bit base, dequantized on the fly (its weight slot is None)
    in_features: int = 0
    a_offset: int = 0                # where A [rank, in] and B [out, rank] start in the adapters tensor
    b_offset: int = 0
    a_trained: bool = False          # whether A, B get a gradient
    b_trained: bool = False


def layout(bases: Sequence[nn.Module], adapters: Sequence[LoraLinear | None],
           shared: int) -> tuple[tuple[Projection, ...], list[torch.Tensor]]:
    """The block's projections, with their matrices' places in the adapters tensor, and the
    pieces (matrices and padding) that `combined` flattens and concatenates into it."""
    pieces: list[torch.Tensor] = []
    at, stacking, placed_a = 0, False, []
    for i, lora in enumerate(adapters):
        if lora is None:
            placed_a.append((None, 0))
            continue
        a = lora.a
        start = _place(pieces, at, a, aligned=i >= shared or not stacking)
        stacking = stacking or i < shared
        placed_a.append((a, start))
        at = start + a.numel()
    plan = []
    for base, lora, (a, a_at) in zip(bases, adapters, placed_a):
        quantized = base if type(base) is Linear4bit else None
        if lora is None:
            plan.append(Projection(base.out_features, False, 0.0, 0, quantized))
            continue
        b = lora.b
        b_at = _place(pieces, at, b, aligned=True)
        at = b_at + b.numel()
        plan.append(Projection(base.out_features, True, lora.scale, lora.r, quantized, a.shape[1], a_at, b_at,
                               a.requires_grad, b.requires_grad))
    return tuple(plan), pieces


def _place(pieces: list[torch.Tensor], at: int, matrix: torch.Tensor, aligned: bool) -> int:
    """Append `matrix` to `pieces`, which hold `at` elements so far, after padding up to a
    multiple of `ALIGN` when `aligned`; returns where it starts."""
    if aligned and at % ALIGN:
        pad = ALIGN - at % ALIGN
        pieces.append(matrix.new_empty(pad))
        at += pad
    pieces.append(matrix)
    return at


def combined(pieces: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The adapters tensor in `dtype`: one concatenation (the pieces flattened in C++, not by a
    Python call each) and one cast, as one autograd node (`_Combine`)."""
    return _Combine.apply(dtype, *pieces)


class _Combine(torch.autograd.Function):
    """Flatten, concatenate and cast a block's adapter matrices; the backward casts the gradient
    back once and hands each matrix its slice of it as a view.

    Why a Function: recorded op by op, the same two operations left autograd a view node per
    matrix, a concatenation node and a cast node, about 20 nodes per decoder layer in the forward
    and again in a checkpoint's recomputation, each run by the engine in the backward (about 27 ms
    of host time a step, profiled, in the eager 8B micro-batch-1 step on an H100, 2026-12-08,
    benchmarks/RESULTS.md). The values and the gradients are the same bits either way."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *pieces: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.shapes = [piece.shape for piece in pieces]
        ctx.source_dtype = pieces[0].dtype
        return _flatten_dense_tensors(pieces).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.to(ctx.source_dtype)
        grads: list[torch.Tensor | None] = [None]
        at = 0
        for shape, needed in zip(ctx.shapes, ctx.needs_input_grad[1:]):
            n = shape.numel()
            grads.append(grad[at:at + n].view(shape) if needed else None)
            at += n
        return tuple(grads)


def a_of(adapters: torch.Tensor, p: Projection) -> torch.Tensor | None:
    """Projection p's A [rank, in] in an adapters tensor (or in its gradient); None when p has no adapter."""
    return _matrix(adapters, p.a_offset, p.rank, p.in_features) if p.adapted else None


def b_of(adapters: torch.Tensor, p: Projection) -> torch.Tensor | None:
    """Projection p's B [out, rank], like `a_of`."""
    return _matrix(adapters, p.b_offset, p.out_features, p.rank) if p.adapted else None


def stacked_a(adapters: torch.Tensor, plan: Sequence[Projection], members: Sequence[int]) -> torch.Tensor | None:
    """The A matrices of the adapted `members` (some of the block's first `shared` projections)
    stacked [sum r, in], a view; None when none is adapted."""
    first, rows = None, 0
    for i in members:
        if plan[i].adapted:
            first = first or plan[i]
            rows += plan[i].rank
    return None if first is None else _matrix(adapters, first.a_offset, rows, first.in_features)


def _matrix(flat: torch.Tensor, offset: int, rows: int, cols: int) -> torch.Tensor:
    """The row-major [rows, cols] matrix at `offset` in the 1-D `flat`, as one view operation."""
    return flat.as_strided((rows, cols), (cols, 1), flat.storage_offset() + offset)
