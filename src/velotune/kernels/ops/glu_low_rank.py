"""The fused LoRA MLP's GLU, forward and in-place backward, adding the adapters' low-rank terms
where it reads gate, up and dh.

Why: the gate and up projections' LoRA terms (s * (X A^T) B^T, r columns wide) were added into the
base outputs by an in-place addmm, which reads and writes a [tokens, intermediate] tensor for a
rank-16 product. On an H100 (Llama-3.1-8B, micro-batch 4: 8,192 x 14,336 bf16) each such addmm
took 265 us, longer than the whole GLU (244 us). The GLU reads gate and up anyway; each of its
tiles also loads the matching rows of X A^T and columns of B^T (small, so they stay in cache) and
adds their product, computed on the tensor cores, before the activation: 319 us for what took
774. The backward does the same for gate and up (saved without their terms) and for dh, whose
down-adapter term d(h A_down^T) A_down was another such addmm (742 us, the same as the two passes
it replaced; 670 us with the tiles below).

Everything is computed in float32 and rounded once; float32 inputs multiply in IEEE float32, not
TF32, so the float32 path matches the reference's arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels.ops.glu import _activation_and_slope
from velotune.kernels.ops.launch import on_device
from velotune.kernels.reference import LowRank

# Tiles (rows x columns) and warps, swept on an H100 at Llama-3.1-8B micro-batch 4 (8,192 x 14,336,
# bf16, rank 16, in the MLP's 2,048-row chunks; scratch sweep of 2026-11-23, copying one such
# tensor took 159 us): forward 357 us at (32, 128, 8), none of 8 tiles faster; backward 670 us at
# (32, 128, 4), against 811 at the (32, 64, 4) chosen before the MLP worked in row chunks, and
# 670-900 for the other 7 tiles.
_FORWARD_TILE = (32, 128, 8)
_BACKWARD_TILE = (32, 128, 4)


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
def _glu_low_rank_kernel(
        DH, GATE, UP, OUT, rows, cols,
        XG, sxg, RG, srgk, srgn, rank_g, scale_g,
        XU, sxu, RU, sruk, srun, rank_u, scale_u,
        XD, sxd, RD, srdk, srdn, rank_d, scale_d,
        HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_D: tl.constexpr,
        RG_PAD: tl.constexpr, RU_PAD: tl.constexpr, RD_PAD: tl.constexpr,
        BACKWARD: tl.constexpr, IEEE: tl.constexpr, GELU_TANH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Forward: h = act(gate) * up into OUT (DH and the dh term unused). BACKWARD: h into OUT (the
    caller passes DH, so h goes over dh), dgate over gate and dup over up; each element is read
    before it is written."""
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
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
            dh = _add_low_rank(dh, XD, sxd, RD, srdk, srdn, rank_d, scale_d, rows, cols, offs_m, offs_n, RD_PAD,
                               IEEE)
        tl.store(GATE + idx, (dh * u * slope).to(GATE.dtype.element_ty), mask=mask)
        tl.store(UP + idx, (dh * act).to(UP.dtype.element_ty), mask=mask)
    tl.store(OUT + idx, (act * u).to(OUT.dtype.element_ty), mask=mask)


def _term_args(term: LowRank | None, like: torch.Tensor) -> tuple[list, bool, int]:
    """(kernel arguments, present, padded rank) of one term; a placeholder pointer when absent."""
    if term is None:
        return [like, 0, like, 0, 0, 0, 0.0], False, 16
    xa = term.xa if term.xa.stride(1) == 1 else term.xa.contiguous()
    rank = xa.shape[1]
    right = term.right.contiguous()   # [r, cols] row-major: coalesced loads along the columns (B^T is tiny)
    args = [xa, xa.stride(0), right, right.stride(0), right.stride(1), rank, float(term.scale)]
    return args, True, max(16, triton.next_power_of_2(rank))


def _grid(rows: int, cols: int, tile: tuple[int, int, int]) -> tuple[int, int]:
    return triton.cdiv(rows, tile[0]), triton.cdiv(cols, tile[1])


def glu_low_rank_triton(gate: torch.Tensor, up: torch.Tensor, gelu_tanh: bool,
                        gate_term: LowRank | None, up_term: LowRank | None) -> torch.Tensor:
    out = torch.empty_like(gate)
    _launch(gate, gate, up, out, gelu_tanh, (gate_term, up_term, None), backward=False)
    return out


def glu_low_rank_backward_inplace_triton(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu_tanh: bool,
                                         gate_term: LowRank | None, up_term: LowRank | None,
                                         dh_term: LowRank | None) -> None:
    _launch(dh, gate, up, dh, gelu_tanh, (gate_term, up_term, dh_term), backward=True)


def _launch(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, gelu_tanh: bool,
            terms: tuple[LowRank | None, LowRank | None, LowRank | None], backward: bool) -> None:
    rows, cols = gate.shape
    (g_args, has_g, rg), (u_args, has_u, ru), (d_args, has_d, rd) = (_term_args(t, gate) for t in terms)
    tile = _BACKWARD_TILE if backward else _FORWARD_TILE
    bm, bn, warps = tile
    with on_device(gate):
        _glu_low_rank_kernel[_grid(rows, cols, tile)](
            dh, gate, up, out, rows, cols, *g_args, *u_args, *d_args, HAS_G=has_g, HAS_U=has_u, HAS_D=has_d,
            RG_PAD=rg, RU_PAD=ru, RD_PAD=rd, BACKWARD=backward, IEEE=gate.dtype == torch.float32,
            GELU_TANH=gelu_tanh, BM=bm, BN=bn, num_warps=warps)
