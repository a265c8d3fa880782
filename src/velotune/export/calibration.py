"""Calibration-aware rounding for quantized GGUF exports.

Why: round-to-nearest puts each weight on the closest grid point on its own. A fine-tune's
change to a weight is often smaller than a 4/5-bit step, so rounding can snap merged = base +
delta straight back to (or near) the base's grid point and erase the fine-tune, worst when the
base itself came from a 4-bit file. What matters is not each weight but each layer's output on
real inputs, so here the rounding minimises that instead:

- `LayerStatistics` runs the run's training rows when the caller has them (`velotune export RUN`,
  the trainer's exports), else a few generic calibration conversations (the model's own chat
  template, text disjoint from any benchmark prompt; models/calibration.py) through the model one decoder layer at a time and
  accumulates H = X^T X of every linear layer's input, so memory holds one layer's statistics and
  the calibration hidden states, never every layer's.
- `gptq_quantize` keeps the block format's grid (fitted per block, with the input channels'
  mean squared activation as importance, as llama.cpp's imatrix does) and chooses codes column by
  column with GPTQ's sweep (`gptq.py`, shared with the W4A16 export), which minimises
  ||X W^T - X Q^T||.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from velotune.export.blockgrid import Codec, Grid, interleave
from velotune.export.gptq import sweep
from velotune.models.calibration import (CALIBRATION_CONVERSATIONS, calibration_ids, is_decoder_linear,
                                         layer_arguments, run_with_input_statistics)
from velotune.models.transformer import Transformer

# Phi-3 exports fuse these; their input is that of the first part.
FUSED_INPUT = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}


class LayerStatistics:
    """H = X^T X of each linear layer's input on the calibration text, computed one decoder layer
    at a time as the export asks for that layer's tensors (in layer order)."""

    def __init__(self, model: Transformer, tokenizer: Any,
                 conversations: Sequence[tuple[str, str]] = CALIBRATION_CONVERSATIONS,
                 calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`calibration`: (ids [B, L], positions [B, L]) of the run's training rows, used instead
        of the generic `conversations` when given."""
        self.model = model
        ids, positions = calibration if calibration is not None else calibration_ids(tokenizer, conversations)
        self.layer_args = layer_arguments(model, ids, positions)
        self.hidden: torch.Tensor = self.layer_args[0][0]
        self.layer = -1
        self.hessians: dict[str, torch.Tensor] = {}

    def advance(self) -> None:
        """Run the next decoder layer on the calibration hidden states, keeping its linears' H."""
        self.layer += 1
        self.hidden, hessians = run_with_input_statistics(
            self.model.model.layers[self.layer], self.hidden, self.layer_args[self.layer],
            is_decoder_linear, torch.float64)
        self.hessians = {path: h.cpu() for path, h in hessians.items()}

    def hessian(self, hf_name: str) -> torch.Tensor | None:
        """H [in, in] (float64) for a decoder layer's linear weight, or None for anything else."""
        parts = hf_name.split(".")
        if parts[:2] != ["model", "layers"] or parts[-1] != "weight" or len(parts) != 6:
            return None
        index, path = int(parts[2]), ".".join(parts[3:5])
        path = path.rsplit(".", 1)[0] + "." + FUSED_INPUT.get(parts[4], parts[4])
        if index < self.layer:
            raise RuntimeError(f"{hf_name}: calibration statistics are computed in layer order; layer {self.layer} "
                               "was already passed")
        while self.layer < index:
            self.advance()
        return self.hessians.get(path)


def gptq_quantize(w: np.ndarray, hessian: torch.Tensor, codec: Codec, damp: float = 0.01,
                  use_importance: bool = True) -> np.ndarray:
    """Quantize `w` [rows, cols] (float32) to `codec`'s bytes [rows, row bytes], choosing codes
    with GPTQ's error compensation under H = X^T X [cols, cols] (`gptq.sweep`), each block's
    grid fitted to the weights as compensated so far."""
    rows, cols = w.shape
    if cols % codec.block:
        raise ValueError(f"rows of {cols} values are not whole {codec.qtype.name} blocks of {codec.block}")
    diag = torch.diagonal(hessian).to(torch.float64)
    importance = (diag / max(float(diag.max()), 1e-30)).float().numpy() if use_importance else None
    grids: dict[int, Grid] = {}

    def fit(index: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        columns = slice(index * codec.block, (index + 1) * codec.block)
        imp = None if importance is None else np.broadcast_to(importance[columns], (rows, codec.block))
        grid = grids[index] = codec.fit(values.numpy(), imp)
        return (torch.from_numpy(grid.scale).repeat_interleave(codec.sub, dim=1),
                torch.from_numpy(grid.offset).repeat_interleave(codec.sub, dim=1))

    codes = sweep(torch.from_numpy(np.array(w, dtype=np.float32)), hessian, codec.block, fit, codec.qmin,
                  codec.qmax, damp)
    grid = interleave([grids[i] for i in range(len(grids))])
    data = codec.pack(codes.numpy().astype(np.int32).reshape(-1, codec.block), grid)
    return data.reshape(rows, cols // codec.block * GGML_QUANT_SIZES[codec.qtype][1])
