"""Per-expert LoRA on a mixture-of-experts layer's stacked experts (models/moe.py).

Each expert e gets its own adapters on both projections: gate_up += s (X A_e^T) B_e^T with
A [E, r, H], B [E, 2I, r], and down likewise with A [E, r, I], B [E, H, r], stored as
`experts.gate_up_lora_A/B` and `experts.down_lora_A/B`. The grouped kernels add them per expert
(kernels/ops/moe.py), never forming B A. A is initialised like a linear adapter's (kaiming-uniform
per expert), B at zero, so training starts from the base model.

Targets: "experts", or any of the MLP projections (gate_proj, up_proj, down_proj, "all-linear"),
which on a mixture-of-experts layer mean its experts. The router (`router`) is adapted only when
named: a LoRA on it changes which experts tokens reach, which fine-tuning usually wants to keep.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from velotune.kernels.moe_reference import ExpertAdapters, Experts
from velotune.lora.config import LoraConfig


class LoraExperts(nn.Module):
    def __init__(self, base: nn.Module, config: LoraConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base_layer = base
        (e, two_i, h), _ = base.shapes if hasattr(base, "shapes") else (base.gate_up_proj.shape, None)
        i = two_i // 2
        dtype = dtype or getattr(base, "dtype", None) or base.gate_up_proj.dtype
        device = next(base.buffers(), None).device if hasattr(base, "shapes") else base.gate_up_proj.device
        r = config.r
        self.scale = config.scale
        self.gate_up_lora_A = nn.Parameter(torch.empty(e, r, h, dtype=dtype, device=device))
        self.gate_up_lora_B = nn.Parameter(torch.zeros(e, two_i, r, dtype=dtype, device=device))
        self.down_lora_A = nn.Parameter(torch.empty(e, r, i, dtype=dtype, device=device))
        self.down_lora_B = nn.Parameter(torch.zeros(e, h, r, dtype=dtype, device=device))
        with torch.no_grad():
            for a in (self.gate_up_lora_A, self.down_lora_A):
                bound = 1 / math.sqrt(a.shape[-1])      # kaiming-uniform with a = sqrt(5), per expert
                a.uniform_(-bound, bound)
            if config.init is False:
                for b in (self.gate_up_lora_B, self.down_lora_B):
                    b.uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r))
        self.adapters_enabled = True

    def computed(self) -> Experts:
        base = self.base_layer.computed()
        if not self.adapters_enabled:
            return base
        return Experts(base.gate_up, base.down, base.gate_up_bias, base.down_bias,
                       ExpertAdapters(self.gate_up_lora_A, self.gate_up_lora_B, self.scale),
                       ExpertAdapters(self.down_lora_A, self.down_lora_B, self.scale), base.activation,
                       base.dequantize)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.gate_up_lora_A, self.gate_up_lora_B, self.down_lora_A, self.down_lora_B]
