"""Linear4bit: a frozen linear layer whose weight lives as packed 4-bit codes.

The codes and every piece of the QuantState are buffers, so `.to(device)` moves them; none is a
Parameter, so no optimizer ever sees the base weight (QLoRA trains adapters around it). The
float32 tables and scales are held as their int32 bit patterns: `model.to(torch.bfloat16)` casts
every floating buffer, which would silently round the code tables, but leaves integers alone.
Checkpoints are written through `state_to_tensors(prefix, layer.packed, layer.quant_state)`. The forward dequantizes the whole weight to the input's dtype and
runs one matmul: the dequantized copy is a temporary that autograd does not keep, because the
weight needs no gradient and the input gradient only needs the weight again, which backward
recomputes by dequantizing once more.
"""
from __future__ import annotations

import torch
from torch import nn

from velotune.quant.nf4 import dequantize_nf4, quantize_nf4
from velotune.quant.state import QuantState


class _DequantLinear(torch.autograd.Function):
    """x @ dequant(W).T, saving the packed codes (not the dequantized weight) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return x @ layer.dequantized_weight(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantized_weight(grad_out.dtype), None


class Linear4bit(nn.Module):
    """y = x @ dequant(W).T + b, with W stored in bitsandbytes' 4-bit layout."""

    def __init__(self, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        self.quant_type = state.quant_type
        self.blocksize = state.blocksize
        self.nested_blocksize = state.nested_blocksize
        self.weight_dtype = state.dtype
        self.offset = state.offset
        self.register_buffer("packed", packed)
        self.register_buffer("code_bits", _bits(state.code))
        self.register_buffer("absmax_bits", _bits(state.absmax))
        self.register_buffer("nested_absmax_bits", _bits(state.nested_absmax))
        self.register_buffer("nested_code_bits", _bits(state.nested_code))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = True) -> Linear4bit:
        """Quantize `linear.weight` (its dtype becomes the dequantization dtype); bias is kept."""
        packed, state = quantize_nf4(linear.weight.detach(), quant_type=quant_type, blocksize=blocksize,
                                     compress_statistics=compress_statistics)
        return cls(packed, state, linear.bias)

    @property
    def quant_state(self) -> QuantState:
        """The state over this module's current buffers (they follow `.to(device)`)."""
        return QuantState(
            quant_type=self.quant_type, code=_floats(self.code_bits), absmax=_floats(self.absmax_bits),
            shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
            blocksize=self.blocksize, offset=self.offset, nested_absmax=_floats(self.nested_absmax_bits),
            nested_code=_floats(self.nested_code_bits), nested_blocksize=self.nested_blocksize,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out_features, in_features] weight, in `dtype` (default: the original dtype)."""
        weight = dequantize_nf4(self.packed, self.quant_state)
        return weight if dtype is None else weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantLinear.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, bias={self.bias is not None}")


def _bits(t: torch.Tensor | None) -> torch.Tensor | None:
    """float32 -> its int32 bit pattern (uint8 codes pass through)."""
    return t.view(torch.int32) if t is not None and t.dtype == torch.float32 else t


def _floats(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.view(torch.float32) if t is not None and t.dtype == torch.int32 else t
