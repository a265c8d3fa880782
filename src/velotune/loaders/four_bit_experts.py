"""4-bit experts while the checkpoint streams in (`load_in_4bit` on a mixture-of-experts model).

A layer's stacked expert weights (gate_up [E, 2I, H], down [E, H, I]) arrive in pieces: one
tensor per expert and projection (Qwen3-MoE), gate and up halves (GGUF), or whole (gpt-oss,
MXFP4 dequantized on the way). Before the model is materialised their parameters are removed
from the meta model, so `to_empty` allocates none of them; each weight gets a 16-bit buffer when
its first piece arrives, is quantized to NF4 (`quant/experts4bit.py`) the moment its last piece
is in and the buffer freed, and the layer's module becomes `ExpertWeights4bit` once both weights
are. Checkpoints keep a layer's tensors together, so at most one layer's 16-bit experts exist at
a time, where quantizing after the load held all of them (48 layers x 1.2 GiB for Qwen3-30B-A3B
in bf16). Biases (gpt-oss) load as usual into the parameters the 4-bit module keeps.

`keep_16bit` patterns that name an experts module (e.g. "experts") leave it 16-bit; the dynamic
choice (`keep_16bit_dynamic`) ranks linear layers only.
"""
from __future__ import annotations

import torch
from torch import nn

from velotune.errors import LoadError
from velotune.quant.experts4bit import ExpertWeights4bit, quantize_stacked

WEIGHTS = ("gate_up_proj", "down_proj")


class FourBitExperts:
    def __init__(self, model: nn.Module, *, source: str, dtype: torch.dtype, device: torch.device,
                 quant_type: str, kept: set[str]) -> None:
        """`model` is still on the meta device; `kept` names experts modules left 16-bit."""
        self.model, self.source, self.dtype, self.device, self.quant_type = model, source, dtype, device, quant_type
        modules = {name: m for name, m in model.named_modules()
                   if getattr(m, "stacked_experts", False) and name not in kept}
        self.shapes = {f"{name}.{w}": tuple(getattr(m, w).shape) for name, m in modules.items() for w in WEIGHTS}
        for m in modules.values():
            for w in WEIGHTS:
                setattr(m, w, None)                   # so to_empty allocates nothing for it
        self.buffers: dict[str, torch.Tensor] = {}
        self.filled: dict[str, int] = {}
        self.quantized: dict[str, dict[str, nn.Module]] = {}
        self.installed: list[str] = []

    def take(self, name: str, tensor: torch.Tensor, index: tuple | None) -> bool:
        """Copy a piece of a stacked expert weight into its buffer; False: not one of ours."""
        if name not in self.shapes:
            return False
        buffer = self.buffers.get(name)
        if buffer is None:
            buffer = self.buffers[name] = torch.empty(self.shapes[name], dtype=self.dtype, device=self.device)
            self.filled[name] = 0
        target = buffer if index is None else buffer[index]
        if tuple(tensor.shape) != tuple(target.shape):
            raise LoadError(f"{self.source}: a piece of {name!r} has shape {tuple(tensor.shape)}, expected "
                            f"{tuple(target.shape)} from the config")
        with torch.no_grad():
            target.copy_(tensor)
        self.filled[name] += target.numel()
        if self.filled[name] >= buffer.numel():
            module, weight = name.rsplit(".", 1)
            self.quantized.setdefault(module, {})[weight] = quantize_stacked(self.buffers.pop(name), self.quant_type)
            if len(self.quantized[module]) == len(WEIGHTS):
                self._install(module, self.quantized.pop(module))
        return True

    def _install(self, path: str, weights: dict[str, nn.Module]) -> None:
        parent, _, short = path.rpartition(".")
        old = self.model.get_submodule(path)
        new = ExpertWeights4bit(weights["gate_up_proj"], weights["down_proj"],
                                (self.shapes[f"{path}.gate_up_proj"], self.shapes[f"{path}.down_proj"]), self.dtype,
                                old.activation, old.gate_up_proj_bias, old.down_proj_bias)
        setattr(self.model.get_submodule(parent), short, new)
        self.installed.append(path)

    def missing(self) -> list[str]:
        """Expert weights that never arrived whole."""
        done = {f"{path}.{w}" for path in self.installed for w in WEIGHTS}
        done |= {f"{path}.{w}" for path, weights in self.quantized.items() for w in weights}
        return sorted(set(self.shapes) - done)
