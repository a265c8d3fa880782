"""Expert tensors of mixture-of-experts checkpoints, turned into the model's stacked layout as
they stream in (models/moe.py: router [E, H], gate_up [E, 2I, H] gate rows then up rows, down
[E, H, I]), and back into a checkpoint's layout for the exporters (`stored_parts`), so each
layout is stated once for both directions.

- GGUF files (llama.cpp's `ffn_gate_exps`/`ffn_up_exps`/`ffn_down_exps`, weights and gpt-oss's
  biases) stack each projection over the experts but keep gate and up apart: each fills its half
  of the rows.
- Qwen3-MoE checkpoints (family row `hf_experts="per_expert"`) store each expert's
  `experts.{e}.gate_proj/up_proj/down_proj.weight` and the router as `mlp.gate.weight`: each
  expert tensor is copied into its rows of the stacked parameter as it arrives (`Piece.index`),
  so a layer never exists twice in memory.
- gpt-oss checkpoints (`hf_experts="interleaved"`) store `experts.gate_up_proj` as [E, H, 2I] with gate and up columns
  interleaved (gate at even, up at odd positions), `experts.down_proj` as [E, I, H]; in the
  original release both as MXFP4 (`*_blocks` [E, out, in/32, 16] bytes holding two e2m1 values
  each, low nibble first, `*_scales` [E, out, in/32] power-of-two exponents biased by 127),
  dequantized here on load (held only until its partner tensor of the pair arrives).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from velotune.models.config import ModelConfig
from velotune.models.families import FAMILIES

PER_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|bias)")
STACKED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|bias)")  # GGUF [E, out, in]
ROUTER = re.compile(r"(model\.layers\.\d+\.mlp)\.(\w+)\.(weight|bias)")
OURS = re.compile(r"(model\.layers\.\d+\.mlp)\.(?:router\.(weight|bias)|experts\.(gate_up_proj|down_proj)(_bias)?)")
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


def interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """All gates then all ups along `dim` -> gpt-oss's alternating order (`deinterleave`'s inverse)."""
    return torch.stack(t.chunk(2, dim=dim), dim=dim + 1).flatten(dim, dim + 1)


class ExpertTensors:
    """Turns one checkpoint's expert tensors into `Piece`s for the builder; others pass through."""

    def __init__(self, config: ModelConfig, source: str) -> None:
        self.config, self.source = config, source
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        family = FAMILIES[config.model_type]
        self.interleaved = family.hf_experts == "interleaved"
        self.router = family.hf_router

    def pieces(self, name: str, tensor: torch.Tensor) -> Iterator[Piece]:
        if not self.config.num_experts:
            yield Piece(name, tensor)
            return
        i = self.config.moe_intermediate_size
        if m := PER_EXPERT.fullmatch(name):
            prefix, e, kind, suffix = m[1], int(m[2]), m[3], "" if m[4] == "weight" else "_bias"
            if kind == "down_proj":
                yield Piece(f"{prefix}.down_proj{suffix}", tensor, (e,))
            else:
                rows = slice(0, i) if kind == "gate_proj" else slice(i, 2 * i)
                yield Piece(f"{prefix}.gate_up_proj{suffix}", tensor, (e, rows))
        elif m := STACKED.fullmatch(name):
            suffix = "" if m[3] == "weight" else "_bias"
            if m[2] == "down_proj":
                yield Piece(f"{m[1]}.down_proj{suffix}", tensor)
            else:
                rows = slice(0, i) if m[2] == "gate_proj" else slice(i, 2 * i)
                yield Piece(f"{m[1]}.gate_up_proj{suffix}", tensor, (slice(None), rows))
        elif (m := ROUTER.fullmatch(name)) and m[2] == self.router:
            yield Piece(f"{m[1]}.router.{m[3]}", tensor)
        elif m := MXFP4.fullmatch(name):
            held = self.pending.setdefault(m[1], {})
            held[m[2]] = tensor
            if len(held) == 2:
                del self.pending[m[1]]
                yield self._gpt_oss(m[1], dequantize_mxfp4(held["blocks"], held["scales"]))
        elif self.interleaved and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            yield self._gpt_oss(name, tensor.transpose(1, 2))
        elif self.interleaved and name.endswith(".experts.gate_up_proj_bias"):
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


Part = tuple[str, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]


def stored_parts(config: ModelConfig, name: str, shape: tuple[int, ...], layout: str) -> list[Part]:
    """The tensors that store our parameter `name` (of `shape`) in `layout`, "hf" (the family's
    Hugging Face checkpoints) or "gguf" (llama.cpp's stacked gate, up and down, under our module
    names): each as (name, shape, the function from our tensor to it). Parameters outside the
    experts and the router come back as they are."""
    m = OURS.fullmatch(name) if config.num_experts else None
    if m is None:
        return [(name, shape, _same)]
    mlp, family = m[1], FAMILIES[config.model_type]
    if m[2]:                                                     # the router
        return [(f"{mlp}.{family.hf_router if layout == 'hf' else 'router'}.{m[2]}", shape, _same)]
    kind, suffix = m[3], "bias" if m[4] else "weight"
    i = config.moe_intermediate_size
    if layout == "hf" and family.hf_experts == "interleaved":
        if m[4]:
            return [(name, shape, (lambda t: interleave(t, 1)) if kind == "gate_up_proj" else _same)]
        if kind == "gate_up_proj":
            return [(name, (shape[0], shape[2], shape[1]), lambda t: interleave(t, 1).transpose(1, 2))]
        return [(name, (shape[0], shape[2], shape[1]), lambda t: t.transpose(1, 2))]
    halves = ([("gate_proj", slice(0, i)), ("up_proj", slice(i, 2 * i))] if kind == "gate_up_proj"
              else [("down_proj", slice(None))])
    rows = i if kind == "gate_up_proj" else shape[1]
    if layout == "gguf":
        return [(f"{mlp}.experts.{proj}.{suffix}", (shape[0], rows, *shape[2:]), _rows(slice(None), part))
                for proj, part in halves]
    return [(f"{mlp}.experts.{e}.{proj}.{suffix}", (rows, *shape[2:]), _rows(e, part))
            for e in range(shape[0]) for proj, part in halves]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _rows(expert: int | slice, rows: slice) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[expert, rows]
