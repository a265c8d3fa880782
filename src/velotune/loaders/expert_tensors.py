"""Expert tensors of mixture-of-experts checkpoints, turned into the model's stacked layout as
they stream in (models/moe.py: router [E, H], gate_up [E, 2I, H] gate rows then up rows, down
[E, H, I]).

- GGUF files (llama.cpp's `ffn_gate_exps`/`ffn_up_exps`/`ffn_down_exps`) stack each projection
  over the experts but keep gate and up apart: each fills its half of the rows.
- Qwen3-MoE checkpoints store each expert's `experts.{e}.gate_proj/up_proj/down_proj.weight` and
  the router as `mlp.gate.weight`: each expert tensor is copied into its rows of the stacked
  parameter as it arrives (`Piece.index`), so a layer never exists twice in memory.
- gpt-oss checkpoints store `experts.gate_up_proj` as [E, H, 2I] with gate and up columns
  interleaved (gate at even, up at odd positions), `experts.down_proj` as [E, I, H]; in the
  original release both as MXFP4 (`*_blocks` [E, out, in/32, 16] bytes holding two e2m1 values
  each, low nibble first, `*_scales` [E, out, in/32] power-of-two exponents biased by 127),
  dequantized here on load (held only until its partner tensor of the pair arrives).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from velotune.models.config import ModelConfig

QWEN_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
STACKED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight")  # GGUF [E, out, in]
ROUTER = re.compile(r"(model\.layers\.\d+\.mlp)\.gate\.weight")
MXFP4 = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.(?:gate_up_proj|down_proj))_(blocks|scales)")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Piece:
    """`tensor` goes into parameter `name` at `index` (None: the whole parameter)."""

    name: str
    tensor: torch.Tensor
    index: tuple[int | slice, ...] | None = None


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] bytes and [..., G] exponents -> float32 [..., G * 32]."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8).to(torch.int64)
    values = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).flatten(-2)      # low nibble first
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None])
    return values.flatten(-2)


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """gpt-oss's alternating gate/up entries along `dim` -> all gates, then all ups."""
    n = t.shape[dim]
    return torch.cat([t.index_select(dim, torch.arange(0, n, 2)), t.index_select(dim, torch.arange(1, n, 2))], dim=dim)


class ExpertTensors:
    """Turns one checkpoint's expert tensors into `Piece`s for the builder; others pass through."""

    def __init__(self, config: ModelConfig, source: str) -> None:
        self.config, self.source = config, source
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.gpt_oss_layout = config.model_type == "gpt_oss"

    def pieces(self, name: str, tensor: torch.Tensor) -> Iterator[Piece]:
        if not self.config.num_experts:
            yield Piece(name, tensor)
            return
        i = self.config.moe_intermediate_size
        if m := QWEN_EXPERT.fullmatch(name):
            prefix, e, kind = m[1], int(m[2]), m[3]
            if kind == "down_proj":
                yield Piece(f"{prefix}.down_proj", tensor, (e,))
            else:
                rows = slice(0, i) if kind == "gate_proj" else slice(i, 2 * i)
                yield Piece(f"{prefix}.gate_up_proj", tensor, (e, rows))
        elif m := STACKED.fullmatch(name):
            if m[2] == "down_proj":
                yield Piece(f"{m[1]}.down_proj", tensor)
            else:
                rows = slice(0, i) if m[2] == "gate_proj" else slice(i, 2 * i)
                yield Piece(f"{m[1]}.gate_up_proj", tensor, (slice(None), rows))
        elif m := ROUTER.fullmatch(name):
            yield Piece(f"{m[1]}.router.weight", tensor)
        elif m := MXFP4.fullmatch(name):
            held = self.pending.setdefault(m[1], {})
            held[m[2]] = tensor
            if len(held) == 2:
                del self.pending[m[1]]
                yield self._gpt_oss(m[1], dequantize_mxfp4(held["blocks"], held["scales"]))
        elif self.gpt_oss_layout and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            yield self._gpt_oss(name, tensor.transpose(1, 2))
        elif self.gpt_oss_layout and name.endswith(".experts.gate_up_proj_bias"):
            yield Piece(name, deinterleave(tensor, 1))
        else:
            yield Piece(name, tensor)

    def _gpt_oss(self, name: str, out_in: torch.Tensor) -> Piece:
        """A gpt-oss expert weight as [E, out, in]: gate_up rows de-interleaved."""
        if name.endswith("gate_up_proj"):
            out_in = deinterleave(out_in, 1)
        return Piece(name, out_in)

    def finish(self) -> list[str]:
        """Names of MXFP4 tensors whose partner never arrived."""
        return [f"{name}_{kind}" for name, held in self.pending.items() for kind in held]
