"""RMSNorm (optionally fused with the residual add) as Triton kernels with a hand-written backward.

Numerics follow `reference.rms_norm_reference` exactly in where they round:
- offset 0 (Llama, Mistral, Qwen, Phi-3): normalise in float32, round to the input dtype, then
  multiply by the weight; the output has the promoted dtype of input and weight.
- offset != 0 (Gemma's `1 + w`): normalise and scale in float32, round once to the input dtype.
The forward stores one float32 inverse RMS per row, so the backward reads x once and recomputes
the normalised row instead of keeping it. The weight gradient is reduced in two stages: every
program accumulates a float32 partial over a contiguous range of rows, and PyTorch sums the few
partials (deterministic, no atomics). It is skipped when the weight is frozen (LoRA).
`add_rms_norm` also writes `x + residual` (the new residual stream) in the same pass, and its
backward adds the residual stream's incoming gradient in the same pass too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels.ops.launch import check_same_device, on_device, persistent_programs, row_block, rows_of


@triton.jit
def _rms_norm_forward_kernel(
    X, x_stride, RES, res_stride, SUM, sum_stride, W, Y, y_stride, RSTD,
    n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(RES + row * res_stride + cols, mask=mask, other=0.0)
        tl.store(SUM + row * sum_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    normed = xf * rstd
    if HAS_OFFSET:
        y = normed * (w + offset)
    else:
        y = normed.to(x.dtype).to(tl.float32) * w
    tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    DY, dy_stride, X, x_stride, W, RSTD, DX, dx_stride, DRES, dres_stride, DW_PARTIAL,
    n_rows, n_cols, offset, rows_per_program,
    HAS_DRES: tl.constexpr, HAS_OFFSET: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        w = w + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # int64 offsets: rows * stride can pass 2**31
    end = tl.minimum(start + rows_per_program, n_rows)
    for row in range(start, end):
        dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0)
        rstd = tl.load(RSTD + row)
        normed = x.to(tl.float32) * rstd
        if COMPUTE_DW:
            if HAS_OFFSET:
                dw += dy * normed
            else:
                dw += dy * normed.to(x.dtype).to(tl.float32)
        dn = dy * w
        dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / n_cols))
        if HAS_DRES:
            dx += tl.load(DRES + row * dres_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) "
                         f"to match the last dim of x {tuple(x.shape)}")
    check_same_device(x=x, weight=weight)


def _forward(x2: torch.Tensor, res2: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float,
             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = x2.shape
    block, warps = row_block(cols, "rms_norm")
    y = torch.empty((rows, cols), dtype=out_dtype, device=x2.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    s = torch.empty_like(x2, memory_format=torch.contiguous_format) if res2 is not None else x2
    with on_device(x2):
        _rms_norm_forward_kernel[(rows,)](
            x2, x2.stride(0), res2 if res2 is not None else x2, res2.stride(0) if res2 is not None else 0,
            s, s.stride(0), weight, y, y.stride(0), rstd, cols, eps, offset,
            HAS_RESIDUAL=res2 is not None, HAS_OFFSET=offset != 0, BLOCK=block, num_warps=warps,
        )
    return y, s, rstd


def _backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
              dres: torch.Tensor | None, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, cols = x2.shape
    block, warps = row_block(cols, "rms_norm")
    dy2 = rows_of(dy, "grad of rms_norm output")
    dres2 = rows_of(dres, "grad of the new residual") if dres is not None else None
    dx = torch.empty((rows, cols), dtype=x2.dtype, device=x2.device)
    programs = persistent_programs(x2.device, rows)
    partial = torch.empty((programs, cols), dtype=torch.float32, device=x2.device) if need_dw else rstd
    with on_device(x2):
        _rms_norm_backward_kernel[(programs,)](
            dy2, dy2.stride(0), x2, x2.stride(0), weight, rstd, dx, dx.stride(0),
            dres2 if dres2 is not None else dy2, dres2.stride(0) if dres2 is not None else 0, partial,
            rows, cols, offset, triton.cdiv(rows, programs),
            HAS_DRES=dres2 is not None, HAS_OFFSET=offset != 0, COMPUTE_DW=need_dw, BLOCK=block, num_warps=warps,
        )
    return dx, partial.sum(0).to(weight.dtype) if need_dw else None


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    return x.dtype if offset else torch.promote_types(x.dtype, weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        x2 = rows_of(x, "rms_norm input")
        y, _, rstd = _forward(x2, None, weight, eps, offset, _output_dtype(x, weight, offset))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape = offset, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, x2, weight, rstd, ctx.offset, None, ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw, None, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
        x2, r2 = rows_of(x, "add_rms_norm x"), rows_of(residual, "add_rms_norm residual")
        y, s, rstd = _forward(x2, r2, weight, eps, offset, _output_dtype(x, weight, offset))
        ctx.save_for_backward(s, weight, rstd)
        ctx.offset, ctx.shape = offset, x.shape
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor, ds: torch.Tensor):
        s, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, s, weight, rstd, ctx.offset, ds, ctx.needs_input_grad[2])
        dx = dx.view(ctx.shape)
        return dx, dx, dw, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    _check(x, weight)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset))


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} must have the same shape and dtype")
    _check(x, weight)
    check_same_device(x=x, residual=residual)
    return AddRMSNormFunction.apply(x, residual, weight, float(eps), float(offset))
