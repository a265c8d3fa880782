"""Gated linear unit `act(gate) * up` (SwiGLU, GeGLU-tanh) as elementwise Triton kernels.

The forward reads gate and up once and writes the product; nothing else is kept. The backward
recomputes act(gate) and its derivative from the saved gate instead of storing the activation
(one extra tensor of the MLP's widest size per layer otherwise) and writes both input gradients
in the same pass. Everything is computed in float32 and rounded once to the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels.ops.launch import check_same_device, on_device
from velotune.kernels.ops.triton_math import tanh
from velotune.kernels.reference import ACTIVATIONS

_BLOCK = 1024


@triton.jit
def _activation_and_slope(g, GELU_TANH: tl.constexpr):
    """act(g) and act'(g), float32. GeLU-tanh: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))."""
    if GELU_TANH:
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        th = tanh(u)
        act = 0.5 * g * (1.0 + th)
        slope = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = tl.sigmoid(g)
        act = g * s
        slope = s * (1.0 + g * (1.0 - s))
    return act, slope


@triton.jit
def _glu_forward_kernel(GATE, UP, OUT, n, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation_and_slope(g, GELU_TANH)
    tl.store(OUT + offs, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward_kernel(DOUT, GATE, UP, DGATE, DUP, OUT, n, GELU_TANH: tl.constexpr, STORE_OUT: tl.constexpr,
                         BLOCK: tl.constexpr):
    """dgate and dup from dout; with STORE_OUT also the recomputed forward output. Every element
    is read before it is written, so the outputs may alias the inputs (the in-place variant)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    act, slope = _activation_and_slope(g, GELU_TANH)
    if STORE_OUT:
        tl.store(OUT + offs, (act * u).to(OUT.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, (dout * u * slope).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dout * act).to(DUP.dtype.element_ty), mask=mask)


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        with on_device(gate):
            _glu_forward_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, GELU_TANH=gelu_tanh, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.gelu_tanh = gelu_tanh
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        with on_device(gate):
            _glu_backward_kernel[(triton.cdiv(n, _BLOCK),)](
                dout, gate, up, dgate, dup, dout, n, GELU_TANH=ctx.gelu_tanh, STORE_OUT=False, BLOCK=_BLOCK)
        return dgate, dup, None


def glu_triton(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu: unknown activation {activation!r}, expected one of {ACTIVATIONS}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"glu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    check_same_device(gate=gate, up=up)
    return GLUFunction.apply(gate, up, activation == "gelu_pytorch_tanh")
