"""4-bit experts for QLoRA on mixture-of-experts models: each stacked expert weight is kept in
bitsandbytes' NF4 layout (blocks of 64 along the input dimension, nested absmax) and dequantized
to the compute dtype inside the experts' forward and again in their backward (kernels/ops/moe.py
calls `Experts.dequantize` in both), so at most one layer's 16-bit experts exist at a time.

Stored as two `Linear4bit` buffers over the flattened [E * out, in] matrices: the same packing,
Triton dequantization and state handling as every other 4-bit weight. Biases (gpt-oss) stay
16-bit and frozen. `load_in_4bit` builds them while the checkpoint streams in
(loaders/four_bit_experts.py); `quantize_experts` converts a model already built.
"""
from __future__ import annotations

import torch
from torch import nn

from velotune.kernels.moe_reference import Experts
from velotune.quant.linear4bit import Linear4bit
from velotune.quant.nf4 import quantize_nf4


class ExpertWeights4bit(nn.Module):
    stacked_experts = True   # apply_lora adapts it like the 16-bit experts (lora/experts.py)

    def __init__(self, gate_up: Linear4bit, down: Linear4bit, shapes: tuple[tuple[int, ...], tuple[int, ...]],
                 dtype: torch.dtype, activation: str, gate_up_bias: nn.Parameter | None = None,
                 down_bias: nn.Parameter | None = None) -> None:
        """The biases are taken as they are (frozen, not copied): the streaming loader may still
        have to copy their values in."""
        super().__init__()
        self.shapes = shapes
        self.gate_up_proj, self.down_proj = gate_up, down
        self.gate_up_proj_bias = None if gate_up_bias is None else gate_up_bias.requires_grad_(False)
        self.down_proj_bias = None if down_bias is None else down_bias.requires_grad_(False)
        self.activation = activation
        self.dtype = dtype

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.gate_up_proj.dequantized_weight(self.dtype).view(self.shapes[0]),
                self.down_proj.dequantized_weight(self.dtype).view(self.shapes[1]))

    def computed(self) -> Experts:
        return Experts(None, None, self.gate_up_proj_bias, self.down_proj_bias, activation=self.activation,
                       dequantize=self.dequantized)


def quantize_stacked(stacked: torch.Tensor, quant_type: str = "nf4") -> Linear4bit:
    """One stacked expert weight [E, out, in] as a 4-bit [E * out, in] matrix."""
    packed, state = quantize_nf4(stacked.detach().reshape(-1, stacked.shape[-1]), quant_type=quant_type)
    return Linear4bit(packed, state)


def four_bit_experts(experts: nn.Module, quant_type: str = "nf4") -> ExpertWeights4bit:
    gate_up, down = experts.gate_up_proj, experts.down_proj
    return ExpertWeights4bit(quantize_stacked(gate_up, quant_type), quantize_stacked(down, quant_type),
                             (tuple(gate_up.shape), tuple(down.shape)), gate_up.dtype, experts.activation,
                             experts.gate_up_proj_bias, experts.down_proj_bias)


def quantize_experts(model: nn.Module, quant_type: str = "nf4") -> int:
    """Replace every 16-bit stacked experts module of a built model by its 4-bit form, one layer at
    a time (each 16-bit layer is freed before the next is quantized); returns how many were
    replaced. Loading with `load_in_4bit` quantizes them as they stream in instead
    (loaders/four_bit_experts.py)."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if getattr(module, "stacked_experts", False) and not isinstance(module, ExpertWeights4bit) \
                and hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, nn.Parameter):
            parent, _, short = name.rpartition(".")
            setattr(model.get_submodule(parent), short, four_bit_experts(module, quant_type))
            del module
            replaced += 1
    return replaced
