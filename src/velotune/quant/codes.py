"""The code tables of bitsandbytes' 4-bit and 8-bit blockwise formats, as float32 tensors.

A 4-bit (or 8-bit) code is an index into one of these tables; the stored value is
`table[code] * absmax(block)`. Checkpoints carry the tables themselves (`quant_map`,
`nested_quant_map`), so dequantization reads the table from the state; these builders are what
quantization writes, and they must equal bitsandbytes' tables bit for bit.
"""
from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")

# NF4: the 16 values are quantiles of N(0, 1) rescaled to [-1, 1] with an exact zero (QLoRA,
# arXiv:2305.14314, appendix); index order is value order.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) before normalisation: index bit 3 is
# the sign, bits 0-2 the magnitude pattern. bitsandbytes stores a positive zero at index 8 too.
_FP4_UNSCALED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@functools.cache
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        table = torch.tensor(_FP4_UNSCALED, dtype=torch.float32)
        return table / table.abs().max()  # float32 division: 12 -> 1.0, 8 -> 2/3, ...
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table of `quant_type` ("nf4" or "fp4")."""
    return _code_4bit_cpu(quant_type).to(device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic 8-bit type (Dettmers, arXiv:1511.04561): decade 10^(e-6) for e = 0..6 holds
    # 2^e values, the centres of 2^e equal bins of [0.1, 1] scaled by the decade, with both signs;
    # plus 0 and 1: 2 * 127 + 2 = 256 entries, sorted. The float32 steps (linspace, bin centres,
    # scaling) are the ones bitsandbytes takes, so the table is identical to the bit.
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        centres = (10 ** (e - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += centres.tolist() + (-centres).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values in [-0.993, 1])."""
    return _dynamic_map_cpu().to(device)
