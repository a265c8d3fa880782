"""Turn a model's projection layers into frozen 4-bit `Linear4bit` layers (QLoRA's base).

Layers are replaced one at a time and each 16-bit weight is dropped as soon as its 4-bit copy
exists, so the extra memory at any moment is one layer's weight.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from velotune.quant.linear4bit import Linear4bit

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_linears(model: nn.Module, targets: Sequence[str] = PROJECTIONS, *, quant_type: str = "nf4") -> list[str]:
    """Replace every `nn.Linear` whose name ends with one of `targets`; returns their names."""
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit.from_linear(module, quant_type=quant_type))
        module.weight = None  # free the 16-bit copy now, not at the end
        done.append(name)
    return done
