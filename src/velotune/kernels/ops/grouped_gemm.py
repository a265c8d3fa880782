"""Grouped GEMMs over experts: rows sorted by expert, one weight matrix per expert.

Two kernels, enough for a mixture-of-experts MLP forward and backward (kernels/ops/moe.py):
- `grouped_mm`: C[rows of e] = alpha * A[rows] @ op(B[e]) (+ bias[e]) (+ C) (* row scale), where
  A's rows may be gathered through an index (the token permutation is read, never written) and
  op(B[e]) is B[e] or its transpose, given by strides. Tiles never straddle two experts: expert e
  owns ceil(rows_e / BM) row tiles, so the grid is at most ceil(R / BM) + E tiles long and idle
  tiles exit at once. The tile -> expert table is built on the device (`RoutePlan`), so nothing
  waits for the GPU and a CUDA graph can capture the step.
- `grouped_weight_grad`: G[e] = alpha * D[rows of e]^T @ A[rows of e] (the gradient of a stacked
  weight, LoRA A/B included), one program per (expert, N tile, K tile) looping over e's rows.

Both accumulate in float32 and round once. Why our own and not `torch._grouped_mm`: the gather,
bias, routing-weight scale and beta = 1 accumulation are folded into the GEMMs' loads and
epilogues, and the kernels also run on the CPU under Triton's interpreter for the tests;
benchmarks/bench_moe.py times them against `torch._grouped_mm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from velotune.kernels.ops.launch import on_device


@dataclass(frozen=True)
class RoutePlan:
    """The choices of N tokens x k experts sorted by expert, as the kernels read them."""

    order: torch.Tensor         # [R] flattened choice index of each sorted row (R = N * k)
    token: torch.Tensor         # [R] int32 token of each sorted row
    inverse: torch.Tensor       # [R] sorted row of each flattened choice
    expert: torch.Tensor        # [R] expert of each sorted row (int64)
    offsets: torch.Tensor       # [E + 1] int32 first sorted row of each expert
    tile_expert: torch.Tensor   # [tiles] int32 expert of each row tile, -1 for idle tiles
    tile_first: torch.Tensor    # [E] int32 first tile of each expert
    block_m: int

    @property
    def rows(self) -> int:
        return self.order.numel()


def route_plan(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> RoutePlan:
    flat = expert_ids.reshape(-1)
    k = expert_ids.shape[-1]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(flat.numel(), block_m) + min(num_experts, flat.numel())
    tile_expert = torch.searchsorted(tile_end, torch.arange(max_tiles, device=flat.device), right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=flat.device)
    return RoutePlan(order, (order // k).to(torch.int32), inverse, flat[order], offsets, tile_expert,
                     (tile_end - tiles).to(torch.int32), block_m)


@triton.jit
def _grouped_mm_kernel(A, A_ROWS, B, BIAS, C, ROW_SCALE, OFFSETS, TILE_EXPERT, TILE_FIRST,
                       N, K, stride_am, stride_be, stride_bk, stride_bn, stride_cm, alpha,
                       GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALED: tl.constexpr,
                       ACCUMULATE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(TILE_EXPERT + pid_m)
    if e < 0:
        return
    end = tl.load(OFFSETS + e + 1)
    rows = tl.load(OFFSETS + e) + (pid_m - tl.load(TILE_FIRST + e)) * BM + tl.arange(0, BM)
    row_ok = rows < end
    if GATHER:
        a_rows = tl.load(A_ROWS + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    b_base = B + e.to(tl.int64) * stride_be
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        a = tl.load(A + a_rows[:, None] * stride_am + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc)
    acc = acc * alpha
    if HAS_BIAS:
        acc += tl.load(BIAS + e.to(tl.int64) * N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    if ROW_SCALED:
        acc *= tl.load(ROW_SCALE + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_weight_grad_kernel(D, A, A_ROWS, G, OFFSETS, N, K, stride_dm, stride_am, alpha,
                                GATHER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e = tl.program_id(0)
    ns = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.program_id(2) * BK + tl.arange(0, BK)
    n_ok, k_ok = ns < N, ks < K
    start = tl.load(OFFSETS + e)
    end = tl.load(OFFSETS + e + 1)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < end
        if GATHER:
            a_rows = tl.load(A_ROWS + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        d = tl.load(D + rows.to(tl.int64)[:, None] * stride_dm + ns[None, :], mask=row_ok[:, None] & n_ok[None, :],
                    other=0.0)
        a = tl.load(A + a_rows[:, None] * stride_am + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(d), a.to(d.dtype), acc)
    g = G + e.to(tl.int64) * N * K + ns[:, None] * K + ks[None, :]
    tl.store(g, (acc * alpha).to(G.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def _blocks(device: torch.device) -> tuple[int, int]:
    """(BN, BK): small under the interpreter (tests), tensor-core sized on a GPU."""
    return (64, 64) if device.type == "cuda" else (16, 16)


def grouped_mm(a: torch.Tensor, weight: torch.Tensor, plan: RoutePlan, *, transpose: bool = True,
               gather: bool = False, bias: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
               out: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """Per sorted row r of expert e: alpha * a[row] @ W_e^T (transpose) or @ W_e, + bias[e], + out
    (when given: accumulated into it), * row_scale[r]. `weight` [E, out, in] (transpose) or
    [E, in, out]; `gather`: a's row is plan.token[r], else r. Returns [R, out]."""
    e, d0, d1 = weight.shape
    n, k = (d0, d1) if transpose else (d1, d0)
    if a.shape[-1] != k or a.stride(-1) != 1:
        raise ValueError(f"grouped_mm: a {tuple(a.shape)} (inner stride {a.stride(-1)}) does not feed weight "
                         f"{tuple(weight.shape)} with transpose={transpose}")
    weight = weight.contiguous()
    stride_bk, stride_bn = (1, d1) if transpose else (d1, 1)
    accumulate = out is not None
    if out is None:
        out = a.new_empty(plan.rows, n)
    bn, bk = _blocks(a.device)
    grid = (plan.tile_expert.numel(), triton.cdiv(n, bn))
    with on_device(a):
        _grouped_mm_kernel[grid](
            a, plan.token, weight, bias if bias is not None else weight, out,
            row_scale if row_scale is not None else out, plan.offsets, plan.tile_expert, plan.tile_first,
            n, k, a.stride(0), weight.stride(0), stride_bk, stride_bn, out.stride(0), alpha,
            GATHER=gather, HAS_BIAS=bias is not None, ROW_SCALED=row_scale is not None, ACCUMULATE=accumulate,
            BM=plan.block_m, BN=bn, BK=bk)
    return out


def grouped_weight_grad(d: torch.Tensor, a: torch.Tensor, plan: RoutePlan, num_experts: int, *,
                        gather: bool = False, alpha: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """G[e] = alpha * d[rows of e]^T @ a[rows of e] ([E, d cols, a cols]); `gather`: a's row is
    plan.token[r]."""
    n, k = d.shape[-1], a.shape[-1]
    g = d.new_empty(num_experts, n, k, dtype=dtype or d.dtype)
    bn, bk = _blocks(d.device)
    grid = (num_experts, triton.cdiv(n, bn), triton.cdiv(k, bk))
    with on_device(d):
        _grouped_weight_grad_kernel[grid](d, a, plan.token, g, plan.offsets, n, k, d.stride(0), a.stride(0), alpha,
                                          GATHER=gather, BM=plan.block_m, BN=bn, BK=bk)
    return g
