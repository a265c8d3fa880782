"""The fused LoRA MLP's GLU, forward and in-place backward, adding the adapters' low-rank terms
where it reads gate, up and dh; the backward also makes the gradients of the gate's and up's X A^T.

Why: the gate and up projections' LoRA terms (s * (X A^T) B^T, r columns wide) were added into the
base outputs by an in-place addmm, which reads and writes a [tokens, intermediate] tensor for a
rank-16 product. On an H100 (Llama-3.1-8B, micro-batch 4: 8,192 x 14,336 bf16) each such addmm
took 265 us, longer than the whole GLU (244 us). The GLU reads gate and up anyway; each of its
tiles also loads the matching rows of X A^T and columns of B^T (small, so they stay in cache) and
adds their product, computed on the tensor cores, before the activation: 319 us for what took
774. The backward does the same for gate and up (saved without their terms) and for dh, whose
down-adapter term d(h A_down^T) A_down was another such addmm (742 us, the same as the two passes
it replaced; 670 us with the tiles below).

The backward also makes the gradients of the gate's and up's X A^T, s dg B_gate and s du B_up,
which were two skinny matmuls reading dg and du once more (168 us at the shapes below). Each tile
of dg and du is multiplied by the matching rows of B on the tensor cores as it is written (883 ->
693 us for the pass and the products at Llama-3.1-8B micro-batch 4). Those
products sum over all columns, so each program walks a strided set of column tiles keeping its
[rows, r] partial sums in registers and writes them once to a float32 buffer [programs per row
block, rows, r]; a second small kernel adds the partials and rounds once. (The forward's
h A_down^T was tried the same way: 423 against 435 us with its matmul, not worth a second path.)
Without products every program handles one tile.

Everything is computed in float32 and rounded once; float32 inputs multiply in IEEE float32, not
TF32, so the float32 path matches the reference's arithmetic. The reductions multiply the written
tensor as rounded to its dtype, the value a separate matmul would read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels.ops.glu import _activation_and_slope
from velotune.kernels.ops.launch import on_device, persistent_programs
from velotune.kernels.reference import LowRank

# Tiles (rows x columns) and warps, swept on an H100 at Llama-3.1-8B micro-batch 4 (8,192 x 14,336,
# bf16, rank 16, in the MLP's 2,048-row chunks; scratch sweep of 2026-11-23, copying one such
# tensor took 159 us): forward 357 us at (32, 128, 8), none of 8 tiles faster; backward 670 us at
# (32, 128, 4), against 811 at the (32, 64, 4) chosen before the MLP worked in row chunks, and
# 670-900 for the other 7 tiles.
_FORWARD_TILE = (32, 128, 8)
_BACKWARD_TILE = (32, 128, 4)
# The backward that also makes d(X A^T): tile, programs per SM and software-pipelining stages of its
# column loop, from a sweep of 63 (7 tiles x 8/16/32 per SM x 1-3 stages; scratch, 2026-11-23, same
# shapes): 693 us against 883 for the kernel without products plus the two matmuls; 698-769 for the
# next 7, up to 2,373 for the worst (one stage: no loads in flight across tiles).
_REDUCING_TILE = (32, 64, 2)
_REDUCING_PROGRAMS_PER_SM = 16
_REDUCING_STAGES = 2
# Rows per program of the partial sums' reduction: 2,048-row chunks then make 128 programs, near one
# per SM (64 rows made 32, which left most of an H100 idle: 22.6 us per call, profiled 2026-11-24).
_PARTIAL_ROWS = 16


@triton.jit
def _add_low_rank(base, XA, stride_xa, RIGHT, stride_rk, stride_rn, rank, scale, rows, cols, offs_m, offs_n,
                  R: tl.constexpr, IEEE: tl.constexpr):
    """base + scale * XA[offs_m, :rank] @ RIGHT[:rank, offs_n] in float32; the rank is padded to
    R >= 16 (the tensor cores' smallest K) with zeros."""
    k = tl.arange(0, R)
    xa = tl.load(XA + offs_m[:, None] * stride_xa + k[None, :],
                 mask=(offs_m[:, None] < rows) & (k[None, :] < rank), other=0.0)
    right = tl.load(RIGHT + k[:, None] * stride_rk + offs_n[None, :] * stride_rn,
                    mask=(k[:, None] < rank) & (offs_n[None, :] < cols), other=0.0)
    if IEEE:
        out = base + tl.dot(xa, right, input_precision="ieee") * scale
    else:
        out = base + tl.dot(xa, right) * scale
    return out


@triton.jit
def _times_right_t(acc, t, RIGHT, stride_rk, stride_rn, rank, cols, offs_n, R: tl.constexpr, IEEE: tl.constexpr):
    """acc + t [BM, BN] @ RIGHT[:rank, offs_n]^T: a tile's share of t @ RIGHT^T, rank padded to R."""
    k = tl.arange(0, R)
    right_t = tl.load(RIGHT + k[None, :] * stride_rk + offs_n[:, None] * stride_rn,
                      mask=(k[None, :] < rank) & (offs_n[:, None] < cols), other=0.0)
    if IEEE:
        return acc + tl.dot(t, right_t, input_precision="ieee")
    return acc + tl.dot(t, right_t)


@triton.jit
def _store_partial(PART, acc, group, rows, width, col0, rank, scale, offs_m, R: tl.constexpr):
    """Columns [col0, col0 + rank) of this program's partial sums, scaled, at PART[group, offs_m]."""
    k = tl.arange(0, R)
    ptr = PART + (group.to(tl.int64) * rows + offs_m[:, None]) * width + col0 + k[None, :]
    tl.store(ptr, acc * scale, mask=(offs_m[:, None] < rows) & (k[None, :] < rank))


@triton.jit
def _glu_low_rank_kernel(
        DH, GATE, UP, OUT, rows, cols, col_step,
        XG, sxg, RG, srgk, srgn, rank_g, scale_g,
        XU, sxu, RU, sruk, srun, rank_u, scale_u,
        XD, sxd, RD, srdk, srdn, rank_d, scale_d,
        PART, width,
        HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_D: tl.constexpr, REDUCE: tl.constexpr,
        RG_PAD: tl.constexpr, RU_PAD: tl.constexpr, RD_PAD: tl.constexpr,
        BACKWARD: tl.constexpr, IEEE: tl.constexpr, GELU_TANH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Forward: h = act(gate) * up into OUT (DH and the dh term unused). BACKWARD: h into OUT (the
    caller passes DH, so h goes over dh), dgate over gate and dup over up, each element read before
    it is written; with REDUCE also this program's shares of scale_g dgate @ RG^T and scale_u dup @
    RU^T. Program (i, j) handles row block i and column tiles j, j + col_step, ..."""
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    group = tl.program_id(1)
    acc_g = tl.zeros((BM, RG_PAD), dtype=tl.float32)   # dgate @ RG^T
    acc_u = tl.zeros((BM, RU_PAD), dtype=tl.float32)   # dup @ RU^T
    for tile in range(group, tl.cdiv(cols, BN), col_step):
        offs_n = tile * BN + tl.arange(0, BN)
        mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
        idx = offs_m[:, None] * cols + offs_n[None, :]
        g = tl.load(GATE + idx, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(UP + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            g = _add_low_rank(g, XG, sxg, RG, srgk, srgn, rank_g, scale_g, rows, cols, offs_m, offs_n, RG_PAD, IEEE)
        if HAS_U:
            u = _add_low_rank(u, XU, sxu, RU, sruk, srun, rank_u, scale_u, rows, cols, offs_m, offs_n, RU_PAD, IEEE)
        act, slope = _activation_and_slope(g, GELU_TANH)
        if BACKWARD:
            dh = tl.load(DH + idx, mask=mask, other=0.0).to(tl.float32)
            if HAS_D:
                dh = _add_low_rank(dh, XD, sxd, RD, srdk, srdn, rank_d, scale_d, rows, cols, offs_m, offs_n,
                                   RD_PAD, IEEE)
            dg = (dh * u * slope).to(GATE.dtype.element_ty)
            du = (dh * act).to(UP.dtype.element_ty)
            tl.store(GATE + idx, dg, mask=mask)
            tl.store(UP + idx, du, mask=mask)
            if REDUCE:
                if HAS_G:
                    acc_g = _times_right_t(acc_g, dg, RG, srgk, srgn, rank_g, cols, offs_n, RG_PAD, IEEE)
                if HAS_U:
                    acc_u = _times_right_t(acc_u, du, RU, sruk, srun, rank_u, cols, offs_n, RU_PAD, IEEE)
        tl.store(OUT + idx, (act * u).to(OUT.dtype.element_ty), mask=mask)
    if REDUCE:
        if HAS_G:
            _store_partial(PART, acc_g, group, rows, width, 0, rank_g, scale_g, offs_m, RG_PAD)
        if HAS_U:
            _store_partial(PART, acc_u, group, rows, width, rank_g if HAS_G else 0, rank_u, scale_u, offs_m, RU_PAD)


@triton.jit
def _sum_partials_kernel(PART, OUT, stride_out, groups, rows, width, plane, BM: tl.constexpr, BW: tl.constexpr):
    """OUT[rows, :width] = sum over the `groups` planes of PART (float32, `plane` = rows x width
    apart), rounded once to OUT's dtype."""
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    k = tl.arange(0, BW)
    mask = (offs_m[:, None] < rows) & (k[None, :] < width)
    ptrs = PART + offs_m[:, None] * width + k[None, :]
    acc = tl.zeros((BM, BW), dtype=tl.float32)
    for _ in range(groups):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += plane
    tl.store(OUT + offs_m[:, None] * stride_out + k[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


def _term_args(term: LowRank | None, like: torch.Tensor) -> tuple[list, bool, int]:
    """(kernel arguments, present, padded rank) of one term; a placeholder pointer when absent."""
    if term is None:
        return [like, 0, like, 0, 0, 0, 0.0], False, 16
    xa = term.xa if term.xa.stride(1) == 1 else term.xa.contiguous()
    rank = xa.shape[1]
    right = term.right.contiguous()   # [r, cols] row-major: coalesced loads along the columns (B^T is tiny)
    args = [xa, xa.stride(0), right, right.stride(0), right.stride(1), rank, float(term.scale)]
    return args, True, _padded(rank)


def _padded(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def glu_low_rank_triton(gate: torch.Tensor, up: torch.Tensor, gelu_tanh: bool,
                        gate_term: LowRank | None, up_term: LowRank | None) -> torch.Tensor:
    out = torch.empty_like(gate)
    _launch(gate, gate, up, out, gelu_tanh, (gate_term, up_term, None), backward=False)
    return out


def glu_low_rank_backward_inplace_triton(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu_tanh: bool,
                                         gate_term: LowRank | None, up_term: LowRank | None,
                                         dh_term: LowRank | None, xa_grads_out: torch.Tensor | None = None) -> None:
    _launch(dh, gate, up, dh, gelu_tanh, (gate_term, up_term, dh_term), backward=True, xa_grads_out=xa_grads_out)


def _launch(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, gelu_tanh: bool,
            terms: tuple[LowRank | None, LowRank | None, LowRank | None], backward: bool,
            xa_grads_out: torch.Tensor | None = None) -> None:
    rows, cols = gate.shape
    (g_args, has_g, rg), (u_args, has_u, ru), (d_args, has_d, rd) = (_term_args(t, gate) for t in terms)
    reduce = xa_grads_out is not None
    bm, bn, warps = _REDUCING_TILE if reduce else _BACKWARD_TILE if backward else _FORWARD_TILE
    row_blocks, col_tiles = triton.cdiv(rows, bm), triton.cdiv(cols, bn)
    col_step, part, width = col_tiles, gate, 0      # no reduction: one tile per program
    if reduce:
        width = xa_grads_out.shape[1]
        programs = persistent_programs(gate.device, row_blocks * col_tiles, _REDUCING_PROGRAMS_PER_SM)
        col_step = min(col_tiles, triton.cdiv(programs, row_blocks))
        part = torch.empty(col_step, rows, width, dtype=torch.float32, device=gate.device)
    with on_device(gate):
        _glu_low_rank_kernel[(row_blocks, col_step)](
            dh, gate, up, out, rows, cols, col_step, *g_args, *u_args, *d_args, part, width,
            HAS_G=has_g, HAS_U=has_u, HAS_D=has_d, REDUCE=reduce, RG_PAD=rg, RU_PAD=ru, RD_PAD=rd,
            BACKWARD=backward, IEEE=gate.dtype == torch.float32, GELU_TANH=gelu_tanh, BM=bm, BN=bn,
            num_warps=warps, **({"num_stages": _REDUCING_STAGES} if reduce else {}))
        if reduce:
            _sum_partials_kernel[(triton.cdiv(rows, _PARTIAL_ROWS),)](
                part, xa_grads_out, xa_grads_out.stride(0), col_step, rows, width, rows * width, BM=_PARTIAL_ROWS,
                BW=triton.next_power_of_2(width))
