"""Which linear layers a 4-bit load quantizes, and the report of what it did.

`FourBitPolicy` says what stays 16-bit: modules named by `keep_16bit` patterns (by default the
embeddings and `lm_head`, whose rows are looked up or produce every logit, so their rounding error
is not averaged away by a following layer), plus, with `dynamic_keep=K`, the K linear layers whose
quantization error is largest.

The error of a layer is the relative error of its output on real inputs, with the input channels
taken as uncorrelated: sqrt(sum_ij dW_ij^2 s_j / sum_ij W_ij^2 s_j), where dW = dequant(quant(W)) - W
and s_j is input channel j's mean squared activation on a few calibration conversations
(`input_scales`, from models/calibration.py). Why not the plain weight error ||dW|| / ||W||: on
SmolLM2-135M (whose weights come from a Q4_1 file) that error is about 0.1 for every projection,
so it ranks almost at random: keeping its worst 30 linears in 16-bit left the demo's eval loss
before training +8.4% above the 16-bit model, against +5.9% for the activation-weighted ranking
(+10.2% with everything in NF4). The plain weight error remains the ranking when no
calibration is possible (a model without a tokenizer): `input_scales` is then None.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from velotune.quant.codes import QUANT_TYPES
from velotune.quant.reference import dequantize_4bit_reference
from velotune.quant.state import QuantState

DEFAULT_KEEP_16BIT = ("embed_tokens", "lm_head")


def matches(name: str, pattern: str) -> bool:
    """`pattern` names module `name` whole ("lm_head", "model.layers.0.mlp.down_proj"), by its
    last components ("mlp.down_proj", "down_proj"), or as a glob ("model.layers.1*.mlp.*")."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


@dataclass(frozen=True)
class FourBitPolicy:
    """How `load_model(..., load_in_4bit=True)` quantizes."""

    keep_16bit: tuple[str, ...] = DEFAULT_KEEP_16BIT
    dynamic_keep: int = 0          # this many more linears, those with the largest error, stay 16-bit
    quant_type: str = "nf4"
    # module name -> [in_features] mean squared input activation; None ranks by weight error alone
    input_scales: Mapping[str, torch.Tensor] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.dynamic_keep < 0:
            raise ValueError(f"keep_16bit_dynamic must not be negative, got {self.dynamic_keep}")
        if isinstance(self.keep_16bit, str):
            raise ValueError(f"keep_16bit must be a list of patterns, got the string {self.keep_16bit!r}")

    def check_patterns(self, module_names: Iterable[str], source: str) -> None:
        """Every keep_16bit pattern must name some module: a typo would silently quantize."""
        names = list(module_names)
        for pattern in self.keep_16bit:
            if not any(matches(n, pattern) for n in names):
                example = next((n for n in names if n.endswith("proj")), names[-1] if names else "")
                raise ValueError(f"{source}: keep_16bit pattern {pattern!r} matches no module of this model "
                                 f"(names look like {example!r})")

    def kept(self, name: str) -> bool:
        return any(matches(name, pattern) for pattern in self.keep_16bit)

    def check_dynamic(self, candidates: int, source: str) -> None:
        """keep_16bit_dynamic counts linears that would otherwise be quantized: more than exist is a mistake."""
        if self.dynamic_keep > candidates:
            raise ValueError(f"{source}: keep_16bit_dynamic={self.dynamic_keep} is more than the {candidates} linear "
                             "layers this model would quantize")

    def error(self, module: str, weight: torch.Tensor, packed: torch.Tensor, state: QuantState) -> float:
        """The ranking error of `module`'s quantized weight (see the module docstring)."""
        if self.input_scales is None:
            return relative_error(weight, packed, state)
        scale = self.input_scales.get(module)
        if scale is None:
            raise ValueError(f"input_scales has no entry for linear layer {module!r}")
        return weighted_relative_error(weight, packed, state, scale)


@dataclass
class QuantReport:
    """What a 4-bit load did: layers quantized, layers kept 16-bit and why, measured errors."""

    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)         # module name -> reason
    errors: dict[str, float] = field(default_factory=dict)     # module name -> relative error
    prequantized: bool = False                                 # read from a *-bnb-4bit checkpoint
    ranking: str = "weight"        # what `errors` measure: "weight" or "activation" (calibrated output)

    def summary(self) -> str:
        origin = "read 4-bit from the checkpoint" if self.prequantized else "quantized to 4-bit"
        text = f"{len(self.quantized)} linear layers {origin}, {len(self.kept)} kept in 16-bit"
        dynamic = {n: self.errors[n] for n, why in self.kept.items() if why == "dynamic" and n in self.errors}
        if dynamic:
            worst = ", ".join(f"{n} ({e:.4f})" for n, e in sorted(dynamic.items(), key=lambda kv: -kv[1]))
            measure = "activation-weighted" if self.ranking == "activation" else "weight"
            text += f"; largest {measure} quantization error, kept 16-bit: {worst}"
        return text


def relative_error(weight: torch.Tensor, packed: torch.Tensor, state: QuantState) -> float:
    """||dequant(packed) - W|| / ||W|| in float32 (0 for an all-zero weight)."""
    exact = weight.float()
    norm = exact.norm()
    if norm == 0:
        return 0.0
    restored = dequantize_4bit_reference(packed, state).float()
    return ((restored - exact).norm() / norm).item()


def weighted_relative_error(weight: torch.Tensor, packed: torch.Tensor, state: QuantState,
                            scale: torch.Tensor) -> float:
    """sqrt(sum dW^2 s / sum W^2 s) over rows and input channels j (s: [in_features] mean squared
    input activation), in float32: the relative output error if input channels were uncorrelated."""
    if scale.shape != weight.shape[-1:]:
        raise ValueError(f"input scale of shape {tuple(scale.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)} (one value per input channel)")
    exact = weight.float()
    s = scale.to(device=exact.device, dtype=torch.float32)
    norm = (exact.square() * s).sum()
    if norm == 0:
        return 0.0
    restored = dequantize_4bit_reference(packed, state).float()
    return ((restored - exact).square().mul(s).sum() / norm).sqrt().item()


def as_policy(keep_16bit: Sequence[str] | None, dynamic_keep: int, quant_type: str,
              input_scales: Mapping[str, torch.Tensor] | None = None) -> FourBitPolicy:
    return FourBitPolicy(keep_16bit=DEFAULT_KEEP_16BIT if keep_16bit is None else tuple(keep_16bit),
                         dynamic_keep=dynamic_keep, quant_type=quant_type, input_scales=input_scales)
