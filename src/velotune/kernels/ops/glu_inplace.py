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

from velotune.kernels.ops.glu import _BLOCK, _glu_backward_kernel
from velotune.kernels.ops.launch import on_device


def glu_backward_inplace_triton(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu_tanh: bool) -> None:
    """The GLU backward kernel with its outputs aliased to its inputs: h over dh, dgate over
    gate, dup over up."""
    n = gate.numel()
    with on_device(gate):
        _glu_backward_kernel[(triton.cdiv(n, _BLOCK),)](dh, gate, up, gate, up, dh, n, GELU_TANH=gelu_tanh,
                                                        STORE_OUT=True, BLOCK=_BLOCK)
