"""Per-input-channel activation scales of every linear layer, for ranking quantization error.

`keep_16bit_dynamic` keeps the linears whose 4-bit rounding hurts the output most. How much a
weight error hurts depends on the input it multiplies: an error in a column fed by a channel that
is always near zero costs nothing. So the ranking weights each input channel by its mean squared
activation on a few generic chat conversations (the same text the GGUF export calibrates on),
as llama.cpp's importance matrix does. Only the diagonal is kept: [in_features] floats per layer,
small even for 8B models, where the full X^T X of a down_proj input would be 0.8 GB per layer.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from velotune.export.calibration import calibration_ids
from velotune.models.layerwise import calibration_forward, pre_hooks


def input_channel_scales(model: nn.Module, tokenizer: Any, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """module name -> [in_features] float32 mean over calibration tokens of x_j^2, for the linear
    layers of `model` called `names` (plain or 4-bit)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.square().sum(dim=0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    targets = {n: model.get_submodule(n) for n in names}
    with pre_hooks((m, record(n)) for n, m in targets.items()):
        calibration_forward(model, *calibration_ids(tokenizer))
    missing = sorted(set(targets) - set(sums))
    if missing:
        raise RuntimeError(f"calibration forward never reached linear layers {missing[:5]}")
    return {name: sums[name] / counts[name] for name in targets}
