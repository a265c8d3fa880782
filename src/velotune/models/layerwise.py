"""Running a model's decoder layers one at a time on calibration text, with the input statistics
H = X^T X of chosen linear layers in each.

Both the GGUF export's GPTQ-style rounding (`export/calibration.py`) and the quantization-error
LoRA initialisation (`quant/error_init.py`) need H for each layer's linears as that layer is
reached, with the hidden states flowing from one layer to the next, so they share this.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def layer_arguments(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> list[tuple[Any, ...]]:
    """The positional arguments each decoder layer receives in a no-grad forward of `ids` [1, T]
    (`positions` restart per packed document): (x, cos, sin, mask, ...). Only the first layer's x
    is kept (the others' slot is None): callers compute the rest layer by layer. Masks differ per
    layer where some layers use a sliding window."""
    layers = model.model.layers
    device = next(model.parameters()).device
    args: list[tuple[Any, ...]] = [() for _ in layers]

    def keep(i: int):
        def hook(_module: nn.Module, layer_args: tuple[Any, ...]) -> None:
            args[i] = layer_args if i == 0 else (None, *layer_args[1:])
        return hook

    handles = [layer.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model.hidden_states(ids.to(device), position_ids=positions.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return args


def run_with_input_statistics(layer: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...],
                              select: Callable[[str, nn.Module], bool], dtype: torch.dtype,
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(layer(hidden, *args[1:]), {path in the layer: H = X^T X of that module's input, in
    `dtype`}) for the submodules `select(path, module)` accepts. Modules reading the same input
    (q/k/v, gate/up) share one H."""
    hessians: dict[str, torch.Tensor] = {}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []   # (input, its H); the input is held so that
    # its id cannot be reused by a later tensor within this layer

    def keep(path: str):
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            known = next((h for held, h in seen if held is x), None)
            if known is None:
                flat = x.reshape(-1, x.shape[-1]).to(dtype)
                known = flat.T @ flat
                seen.append((x, known))
            hessians[path] = known
        return hook

    handles = [m.register_forward_pre_hook(keep(name)) for name, m in layer.named_modules() if select(name, m)]
    try:
        with torch.no_grad():
            out = layer(hidden, *args[1:])
    finally:
        for handle in handles:
            handle.remove()
    return out, hessians
