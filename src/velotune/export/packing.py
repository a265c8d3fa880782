"""The compressed-tensors "pack-quantized" layout of 4-bit weights, as vLLM and transformers read it.

What a reader expects of one quantized linear `P` with weight [out, in] (facts taken from the
compressed-tensors package, which the tests use as the reference unpacker):
- `P.weight_packed` int32 [out, ceil(in / 8)]: each code q in [-8, 7] is stored as the unsigned
  nibble q + 8; value i of a row sits in bits 4*(i % 8) .. 4*(i % 8) + 3 of word i // 8 (a row's
  tail is padded with code 0);
- `P.weight_scale` [out, in / group] in the model's float dtype;
- `P.weight_zero_point` int32 [ceil(out / 8), in / group] (asymmetric only): the signed zero
  points packed the same way but down the rows, each column of groups on its own;
- `P.weight_shape` int64 [2]: (out, in);
- dequantized: w = (q - zero) * scale, zero = 0 when symmetric.
`quantization_config` is the config.json block that names this scheme (W4A16, group strategy).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

BITS = 4
PER_WORD = 32 // BITS
OFFSET = 1 << (BITS - 1)      # stored nibble = code + OFFSET
QMIN, QMAX = -OFFSET, OFFSET - 1


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes [rows, cols] (any integer dtype, values in [-8, 7]) -> int32
    [rows, ceil(cols / 8)], packed along each row."""
    rows, cols = codes.shape
    nibbles = (codes.to(torch.int64) + OFFSET)
    nibbles = F.pad(nibbles, (0, -cols % PER_WORD))
    shifts = torch.arange(PER_WORD, device=codes.device, dtype=torch.int64) * BITS
    words = (nibbles.view(rows, -1, PER_WORD) << shifts).sum(dim=-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)    # the 32 bits as a signed int32


def unpack_rows(words: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of `pack_rows`: int32 [rows, words] -> int8 codes [rows, cols]."""
    shifts = torch.arange(PER_WORD, device=words.device, dtype=torch.int64) * BITS
    nibbles = (words.to(torch.int64)[..., None] >> shifts) & 0xF
    return (nibbles.reshape(words.shape[0], -1)[:, :cols] - OFFSET).to(torch.int8)


def pack_columns(codes: torch.Tensor) -> torch.Tensor:
    """Zero points [rows, groups] -> int32 [ceil(rows / 8), groups], packed down each column."""
    return pack_rows(codes.T).T.contiguous()


def unpack_columns(words: torch.Tensor, rows: int) -> torch.Tensor:
    return unpack_rows(words.T.contiguous(), rows).T.contiguous()


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - zero) * scale per group: codes [out, in], scale and zero [out, in / group]. The
    product is rounded to the scale's dtype, as the readers compute it (q - zero is an integer
    of at most 5 bits, exact in any float type)."""
    group = codes.shape[1] // scale.shape[1]
    q = codes.to(torch.float32)
    if zero is not None:
        q = q - zero.to(torch.float32).repeat_interleave(group, dim=1)
    return (q.to(scale.dtype) * scale.repeat_interleave(group, dim=1)).to(dtype)


def quantization_config(symmetric: bool, group_size: int, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config` for W4A16 group-quantized linears in pack-quantized form."""
    weights = {"num_bits": BITS, "type": "int", "symmetric": symmetric, "strategy": "group",
               "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}, "block_structure": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
