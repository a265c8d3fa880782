"""4-bit weights in bitsandbytes' checkpoint layout, as `*-bnb-4bit` safetensors files hold them.

For a weight named P the checkpoint holds:

    P                                   uint8 [ceil(n/2), 1]  packed codes, first in high nibble
    P.absmax                            uint8 codes (nested) or float32, one per block
    P.quant_map                         float32 [16]          the 4-bit table
    P.nested_absmax                     float32               nested only
    P.nested_quant_map                  float32 [256]         nested only: the 8-bit dynamic map
    P.quant_state.bitsandbytes__<type>  uint8                 UTF-8 JSON: quant_type, blocksize,
                                        dtype, shape, and (nested) nested_blocksize, nested_dtype,
                                        nested_offset

The JSON is written with the same keys in the same order as bitsandbytes, so the bytes match.
Reading checks every piece against the others and names the offending tensor; layouts we do not
read (packed codes stored in another dtype, other quant types, non-float32 nested statistics) are
refused rather than guessed at.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from velotune.quant.codes import QUANT_TYPES
from velotune.quant.state import VALID_BLOCKSIZES, WEIGHT_DTYPES, QuantState

STATE_KEY = "quant_state.bitsandbytes__"
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in WEIGHT_DTYPES}


class QuantFormatError(ValueError):
    """A 4-bit checkpoint entry we cannot read; the message names the tensor."""


def state_to_tensors(prefix: str, packed: torch.Tensor, state: QuantState) -> dict[str, torch.Tensor]:
    """The tensors that store weight `prefix` in bitsandbytes' layout."""
    meta: dict[str, Any] = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": str(state.dtype).removeprefix("torch."),
        "shape": list(state.shape),
    }
    out = {prefix: packed, f"{prefix}.absmax": state.absmax, f"{prefix}.quant_map": state.code.clone()}
    if state.nested:
        out[f"{prefix}.nested_absmax"] = state.nested_absmax
        out[f"{prefix}.nested_quant_map"] = state.nested_code.clone()  # tables: never shared between weights
        meta.update(nested_blocksize=state.nested_blocksize, nested_dtype="float32", nested_offset=state.offset)
    out[f"{prefix}.{STATE_KEY}{state.quant_type}"] = torch.tensor(
        list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def state_from_tensors(prefix: str, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, QuantState]:
    """Read weight `prefix` back from a mapping of checkpoint tensors (packed codes, state)."""
    own = {k: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    state_keys = [k for k in own if k.startswith(f"{prefix}.quant_state.")]
    if len(state_keys) != 1:
        found = ", ".join(state_keys) or "none"
        raise QuantFormatError(f"{prefix}: expected one tensor {prefix}.{STATE_KEY}<nf4|fp4>, found {found}")
    state_key = state_keys[0]
    quant_type = state_key.removeprefix(f"{prefix}.{STATE_KEY}")
    if not state_key.startswith(f"{prefix}.{STATE_KEY}") or quant_type not in QUANT_TYPES:
        raise QuantFormatError(f"{state_key}: unsupported quantization state (expected {STATE_KEY}nf4 or fp4)")
    meta = _read_meta(state_key, own[state_key])
    nested = "nested_offset" in meta
    known = {prefix, state_key, f"{prefix}.absmax", f"{prefix}.quant_map"}
    if nested:
        known |= {f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"}
    for key in own:
        if key not in known:
            raise QuantFormatError(f"{key}: unexpected tensor for a {'nested ' if nested else ''}4-bit weight")

    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise QuantFormatError(f"{key}: missing (needed by {state_key})")
        return tensors[key]

    if meta["quant_type"] != quant_type:
        raise QuantFormatError(f"{state_key}: JSON says quant_type {meta['quant_type']!r}")
    if meta["blocksize"] not in VALID_BLOCKSIZES:
        raise QuantFormatError(f"{state_key}: blocksize {meta['blocksize']} not in {VALID_BLOCKSIZES}")
    if meta["dtype"] not in _DTYPE_NAMES:
        raise QuantFormatError(f"{state_key}: dtype {meta['dtype']!r} not one of {sorted(_DTYPE_NAMES)}")
    shape = torch.Size(meta["shape"])
    numel = shape.numel()
    blocks = -(-numel // meta["blocksize"])

    packed = need(prefix)
    if packed.dtype != torch.uint8:
        raise QuantFormatError(f"{prefix}: packed 4-bit codes stored as {packed.dtype}; only uint8 is supported")
    _check_size(prefix, packed, -(-numel // 2), f"shape {list(shape)} in {state_key}")
    code = _float_table(f"{prefix}.quant_map", need(f"{prefix}.quant_map"), 16)
    absmax = need(f"{prefix}.absmax")
    _check_size(f"{prefix}.absmax", absmax, blocks, f"{numel} weights in blocks of {meta['blocksize']}")
    if not nested:
        if absmax.dtype != torch.float32:
            raise QuantFormatError(f"{prefix}.absmax: {absmax.dtype}; a 4-bit weight without nesting needs float32")
        return packed, QuantState(quant_type=quant_type, code=code, absmax=absmax, shape=shape,
                                  dtype=_DTYPE_NAMES[meta["dtype"]], blocksize=meta["blocksize"])

    if absmax.dtype != torch.uint8:
        raise QuantFormatError(f"{prefix}.absmax: {absmax.dtype}; a nested 4-bit weight stores uint8 codes")
    if meta.get("nested_dtype") != "float32":
        raise QuantFormatError(f"{state_key}: nested_dtype {meta.get('nested_dtype')!r}; only float32 is supported")
    nested_blocksize = meta.get("nested_blocksize")
    if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
        raise QuantFormatError(f"{state_key}: nested_blocksize {nested_blocksize!r} is not a positive integer")
    nested_absmax = need(f"{prefix}.nested_absmax")
    if nested_absmax.dtype != torch.float32:
        raise QuantFormatError(f"{prefix}.nested_absmax: {nested_absmax.dtype}; only float32 is supported")
    _check_size(f"{prefix}.nested_absmax", nested_absmax, -(-blocks // nested_blocksize),
                f"{blocks} absmax codes in blocks of {nested_blocksize}")
    nested_code = _float_table(f"{prefix}.nested_quant_map", need(f"{prefix}.nested_quant_map"), 256)
    return packed, QuantState(
        quant_type=quant_type, code=code, absmax=absmax, shape=shape, dtype=_DTYPE_NAMES[meta["dtype"]],
        blocksize=meta["blocksize"], offset=float(meta["nested_offset"]), nested_absmax=nested_absmax,
        nested_code=nested_code, nested_blocksize=nested_blocksize,
    )


def _read_meta(key: str, tensor: torch.Tensor) -> dict[str, Any]:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise QuantFormatError(f"{key}: expected a 1-D uint8 tensor of JSON, got {tensor.dtype} {list(tensor.shape)}")
    try:
        meta = json.loads(bytes(tensor.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantFormatError(f"{key}: not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise QuantFormatError(f"{key}: JSON is not an object")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise QuantFormatError(f"{key}: JSON lacks {field!r}")
    if not isinstance(meta["shape"], list) or not all(isinstance(d, int) and d >= 0 for d in meta["shape"]):
        raise QuantFormatError(f"{key}: shape {meta['shape']!r} is not a list of sizes")
    return meta


def _float_table(key: str, tensor: torch.Tensor, size: int) -> torch.Tensor:
    if tensor.dtype != torch.float32 or tensor.shape != (size,):
        raise QuantFormatError(f"{key}: expected float32 [{size}], got {tensor.dtype} {list(tensor.shape)}")
    return tensor


def _check_size(key: str, tensor: torch.Tensor, expected: int, why: str) -> None:
    if tensor.numel() != expected:
        raise QuantFormatError(f"{key}: {tensor.numel()} elements; {why} needs {expected}")
