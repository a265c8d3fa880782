"""Entry points for 4-bit weights: quantize with the reference, dequantize through dispatch.

Dequantization runs on every forward of a QLoRA layer, so it has a Triton kernel, chosen by the
project-wide rule of `velotune.kernels.dispatch.use_triton` (CUDA tensors, Triton installed,
kernels enabled); the plain-PyTorch reference runs everywhere else. Quantization runs once per weight at load time and stays in
PyTorch (its ops run on the GPU as well).
"""
from __future__ import annotations

import torch

from velotune.kernels.dispatch import use_triton
from velotune.quant.reference import dequantize_4bit_reference, quantize_4bit_reference
from velotune.quant.state import QuantState


def quantize_nf4(
    weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Quantize `weight` to packed 4-bit codes ([ceil(n/2), 1] uint8) and their QuantState, in
    bitsandbytes' layout (`quant_type` "nf4" or "fp4"; `compress_statistics` nests the absmax)."""
    return quantize_4bit_reference(weight, quant_type=quant_type, blocksize=blocksize,
                                   compress_statistics=compress_statistics)


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The weight of `state.shape` and `state.dtype` that `packed` encodes."""
    if use_triton(packed):
        from velotune.quant.dequant_triton import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, state)
    return dequantize_4bit_reference(packed, state)
