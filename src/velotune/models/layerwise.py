"""Running a model's decoder layers one at a time on calibration text, with the input statistics
H = X^T X of chosen linear layers in each.

Both the GGUF export's GPTQ-style rounding (`export/calibration.py`) and the quantization-error
LoRA initialisation (`quant/error_init.py`) need H for each layer's linears as that layer is
reached, with the hidden states flowing from one layer to the next, so they share this; the
16-bit ranking's channel scales (`quant/calibration.py`) use its hooked calibration forward.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def pre_hooks(hooks: Iterable[tuple[nn.Module, Callable[..., None]]]) -> Iterator[None]:
    """Forward pre-hooks on modules for the duration of the block, removed however it ends."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def calibration_forward(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> None:
    """A no-grad pass of `ids` [B, T] through the decoder stack (`positions` restart per packed
    document), on the model's device; what it yields is seen through hooks."""
    device = next(model.parameters()).device
    with torch.no_grad():
        model.hidden_states(ids.to(device), position_ids=positions.to(device))


def layer_arguments(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> list[tuple[Any, ...]]:
    """The positional arguments each decoder layer receives in a no-grad forward of `ids` [B, T]
    (`positions` restart per packed document): (x, cos, sin, mask, ...). Only the first layer's x
    is kept (the others' slot is None): callers compute the rest layer by layer. Masks differ per
    layer where some layers use a sliding window."""
    layers = model.model.layers
    args: list[tuple[Any, ...]] = [() for _ in layers]

    def keep(i: int):
        def hook(_module: nn.Module, layer_args: tuple[Any, ...]) -> None:
            args[i] = layer_args if i == 0 else (None, *layer_args[1:])
        return hook

    with pre_hooks((layer, keep(i)) for i, layer in enumerate(layers)):
        calibration_forward(model, ids, positions)
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

    with pre_hooks((m, keep(name)) for name, m in layer.named_modules() if select(name, m)), torch.no_grad():
        out = layer(hidden, *args[1:])
    return out, hessians
