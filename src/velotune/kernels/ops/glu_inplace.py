"""The GLU backward of the fused LoRA MLP, written into the buffers it reads.

When the fused MLP's backward reaches the GLU, three [tokens, intermediate] tensors are live: the
incoming gradient dh and the saved gate and up activations. Each is dead once read, and the pass
needs three outputs of the same size: h = act(gate) * up (recomputed, for the down adapter's A
gradient) and the two input gradients. One elementwise pass reads all three and writes h over dh,
dgate over gate and dup over up, so the backward allocates no new tensor of the MLP's widest size.
Everything is computed in float32 and rounded once, with the same formulas as the forward kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels.ops.glu import _activation_and_slope
from velotune.kernels.ops.launch import on_device

_BLOCK = 1024


@triton.jit
def _glu_backward_inplace_kernel(DH, GATE, UP, n, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    act, slope = _activation_and_slope(g, GELU_TANH)
    tl.store(DH + offs, (act * u).to(DH.dtype.element_ty), mask=mask)
    tl.store(GATE + offs, (dh * u * slope).to(GATE.dtype.element_ty), mask=mask)
    tl.store(UP + offs, (dh * act).to(UP.dtype.element_ty), mask=mask)


def glu_backward_inplace_triton(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu_tanh: bool) -> None:
    n = gate.numel()
    with on_device(gate):
        _glu_backward_inplace_kernel[(triton.cdiv(n, _BLOCK),)](dh, gate, up, n, GELU_TANH=gelu_tanh, BLOCK=_BLOCK)
