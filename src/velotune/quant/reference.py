"""Blockwise 4-bit (NF4/FP4) quantization in plain PyTorch: the CPU path and the kernel's oracle.

The arithmetic follows bitsandbytes step for step, so codes and scales match it bit for bit:

* The weight is flattened (row-major) and cut into blocks of `blocksize`; a short last block is
  allowed. Each block's absmax is taken in float32.
* Full blocks are scaled by the float32 reciprocal of max(absmax, 1e-38); the short last block is
  divided by its absmax instead (bitsandbytes does exactly this), then clamped to [-1, 1].
* The code is the nearest table entry: a binary search over the midpoints of the sorted table,
  with a value on a midpoint taking the lower entry. FP4's table is not sorted, so the sorted
  position maps back to the code through a stable argsort (ties between its two zeros resolve as
  in bitsandbytes' PyTorch backend).
* Two codes per byte, the first element in the high nibble; an odd count is padded with the code
  of 0.0. The packed tensor has bitsandbytes' shape [ceil(n / 2), 1].
* Nesting (compress_statistics): offset = mean of the float32 absmax; (absmax - offset) is
  quantized blockwise (256) to the 8-bit dynamic map with the same scale-and-nearest rule.
  This is the rule of bitsandbytes' CUDA kernel and PyTorch backend; its native CPU library
  instead looks codes up in a 65536-bin table and can land one code off near a midpoint.

Dequantization: absmax = dynamic_map[q] * nested_absmax + offset, then table[code] * absmax in
float32, cast to the weight's dtype (round to nearest even).
"""
from __future__ import annotations

import torch

from velotune.quant.codes import QUANT_TYPES, code_4bit, dynamic_map
from velotune.quant.state import VALID_BLOCKSIZES, WEIGHT_DTYPES, QuantState, scale_blocks

NESTED_BLOCKSIZE = 256
QUANTIZE_CHUNK = 1 << 20   # values quantized at once (whole blocks)


def _scale_to_unit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax of float32 `flat`, and `flat` scaled into [-1, 1] by it."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).view(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, tail / tail_absmax])
    return scaled.clamp(-1.0, 1.0), absmax


def _nearest_code(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of `table` for each value (ties to the lower entry)."""
    order = torch.argsort(table, stable=True)
    ordered = table[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-map codes (uint8) of float32 `values` and their per-block float32 absmax."""
    scaled, absmax = _scale_to_unit(values.reshape(-1).float(), blocksize)
    codes = _nearest_code(scaled, dynamic_map(values.device)).to(torch.uint8)
    return codes, absmax


def quantize_4bit_reference(
    weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True
) -> tuple[torch.Tensor, QuantState]:
    _check_arguments(weight, quant_type, blocksize)
    table = code_4bit(quant_type, weight.device)
    flat = weight.reshape(-1)
    packed = torch.empty(-(-flat.numel() // 2), dtype=torch.uint8, device=weight.device)
    absmaxes = []
    # Whole blocks a chunk at a time: the float32 and int64 temporaries (~28 bytes per value)
    # then exist for one chunk, not for the whole weight, which keeps load_in_4bit's peak near
    # the 4-bit size (an 8B MLP weight would otherwise need 1.6 GB of workspace).
    step = blocksize * max(1, QUANTIZE_CHUNK // blocksize)
    for start in range(0, flat.numel(), step):
        scaled, absmax = _scale_to_unit(flat[start:start + step].float(), blocksize)
        absmaxes.append(absmax)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        codes = _nearest_code(scaled, table).to(torch.uint8)
        packed[start // 2:start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
    absmax = torch.cat(absmaxes)
    packed = packed.view(-1, 1)
    state = QuantState(quant_type=quant_type, code=table, absmax=absmax, shape=weight.shape,
                       dtype=weight.dtype, blocksize=blocksize)
    if not compress_statistics:
        return packed, state
    offset = absmax.mean()
    nested_codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return packed, QuantState(
        quant_type=quant_type, code=table, absmax=nested_codes, shape=weight.shape, dtype=weight.dtype,
        blocksize=blocksize, offset=offset.item(), nested_absmax=nested_absmax,
        nested_code=dynamic_map(weight.device), nested_blocksize=NESTED_BLOCKSIZE,
    )


def dequantize_4bit_reference(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    check_packed(packed, state)
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).view(-1)[: state.numel]
    values = scale_blocks(state.code[codes.long()], state.absmax_float(), state.blocksize)
    return values.to(state.dtype).view(state.shape)


def check_packed(packed: torch.Tensor, state: QuantState) -> None:
    """Raise ValueError when `packed` cannot hold the codes `state` describes."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed 4-bit weight must be uint8, got {packed.dtype}")
    expected = -(-state.numel // 2)
    if packed.numel() != expected:
        raise ValueError(
            f"packed 4-bit weight has {packed.numel()} bytes; shape {tuple(state.shape)} needs {expected}"
        )
    if state.absmax.numel() != state.num_blocks:
        raise ValueError(
            f"absmax has {state.absmax.numel()} entries; {state.numel} weights in blocks of "
            f"{state.blocksize} need {state.num_blocks}"
        )


def _check_arguments(weight: torch.Tensor, quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"4-bit quantization takes bfloat16, float16 or float32 weights, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
