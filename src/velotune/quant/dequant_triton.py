"""Triton kernel: packed 4-bit codes -> weight, the double dequantization fused in one pass.

Each program writes BLOCK consecutive weights. Weight i reads byte i // 2 (high nibble for even
i), its 4-bit table entry, and its block's scale; with nesting the scale is decoded on the fly
from the uint8 absmax code, the 8-bit map, the nested absmax and the offset, so the float32
absmax is never materialised. The bfloat16 output is rounded to nearest even with integer ops
rather than a cast, because Triton's CPU interpreter truncates on that cast while the GPU rounds;
this way both match torch. Floating-point contraction is switched off at launch so that
`map[q] * nested_absmax + offset` rounds twice, like the reference, and the output equals the
reference bit for bit. Offsets are int64: embedding matrices pass 2^31 nibbles.

The block sizes are compile-time constants (one compilation per size; checkpoints use one or two),
so the weight index // blocksize is a shift instead of a 64-bit division by a runtime value. On an H100
(graph-replayed, 2026-11-23) that took a [14336, 4096] NF4 weight to bfloat16 from 78.5 to 62.0
us (1.87 to 2.37 TB/s) and a [4096, 4096] one from 23.7 to 19.3 us. One lane per packed byte,
writing both weights, was not faster (66-89 us over 8 tile shapes), nor were 8 warps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.quant.reference import check_packed
from velotune.quant.state import QuantState

BLOCK = 1024

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _dequant_4bit_kernel(
    packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr,
    offset, n,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 0x0F)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = idx // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * tl.load(
            nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    result = value * scale
    if OUT_DTYPE == tl.bfloat16:
        bits = result.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + idx, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + idx, result.to(OUT_DTYPE), mask=mask)


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Same contract as `dequantize_4bit_reference`; every tensor must be on one device."""
    check_packed(packed, state)
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    n = state.numel
    nested = state.nested
    absmax = state.absmax if nested else state.absmax.float()
    _dequant_4bit_kernel[(triton.cdiv(n, BLOCK),)](
        packed.reshape(-1), state.code, absmax,
        state.nested_absmax if nested else absmax,   # unused when not nested
        state.nested_code if nested else state.code,  # unused when not nested
        out, float(state.offset or 0.0), n,
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize or 1, NESTED=nested,
        OUT_DTYPE=_TL_DTYPES[state.dtype], BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
    return out
