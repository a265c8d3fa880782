"""4-bit experts for QLoRA on mixture-of-experts models: each stacked expert weight is kept in
bitsandbytes' NF4 layout (blocks of 64 along the input dimension, nested absmax) and dequantized
to the compute dtype inside the experts' forward and again in their backward (kernels/ops/moe.py
calls `Experts.dequantize` in both), so at most one layer's 16-bit experts exist at a time.

Stored as two `Linear4bit` buffers over the flattened [E * out, in] matrices: the same packing,
Triton dequantization and state handling as every other 4-bit weight. Biases (gpt-oss) stay
16-bit and frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from velotune.kernels.moe_reference import Experts
from velotune.quant.linear4bit import Linear4bit
from velotune.quant.nf4 import quantize_nf4


class ExpertWeights4bit(nn.Module):
    stacked_experts = True   # apply_lora adapts it like the 16-bit experts (lora/experts.py)

    def __init__(self, experts: nn.Module, quant_type: str = "nf4") -> None:
        super().__init__()
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        self.shapes = (tuple(gate_up.shape), tuple(down.shape))
        self.gate_up_proj = _quantized(gate_up, quant_type)
        self.down_proj = _quantized(down, quant_type)
        self.gate_up_proj_bias = _frozen(experts.gate_up_proj_bias)
        self.down_proj_bias = _frozen(experts.down_proj_bias)
        self.activation = experts.activation
        self.dtype = gate_up.dtype

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.gate_up_proj.dequantized_weight(self.dtype).view(self.shapes[0]),
                self.down_proj.dequantized_weight(self.dtype).view(self.shapes[1]))

    def computed(self) -> Experts:
        return Experts(None, None, self.gate_up_proj_bias, self.down_proj_bias, activation=self.activation,
                       dequantize=self.dequantized)


def _quantized(stacked: torch.Tensor, quant_type: str) -> Linear4bit:
    packed, state = quantize_nf4(stacked.reshape(-1, stacked.shape[-1]), quant_type=quant_type)
    return Linear4bit(packed, state)


def _frozen(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


def quantize_experts(model: nn.Module, quant_type: str = "nf4") -> int:
    """Replace every 16-bit stacked experts module by its 4-bit form, one layer at a time (each
    16-bit layer is freed before the next is quantized); returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if getattr(module, "stacked_experts", False) and not isinstance(module, ExpertWeights4bit) \
                and hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, nn.Parameter):
            parent, _, short = name.rpartition(".")
            setattr(model.get_submodule(parent), short, ExpertWeights4bit(module, quant_type))
            del module
            replaced += 1
    return replaced
