"""`*-bnb-4bit` Hugging Face folders: reading their quantization_config and grouping their
tensors. (Writing one, which only the tests do to check that transformers + bitsandbytes read our
layout, is tests/quant/bnb_saver.py.)

A bnb 4-bit folder is an ordinary HF folder whose config.json carries
`quantization_config: {quant_method: bitsandbytes, load_in_4bit: true, ...}` and whose linear
weights are stored as the tensor group `serialization.py` describes. We read only the 4-bit
layout with uint8 storage; 8-bit (LLM.int8) folders and other storage dtypes are refused with
the field named, since guessing would load garbage.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# The tensor names a 4-bit weight P owns besides P itself.
PIECE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
STATE_PREFIX = "quant_state."   # any quant_state.* tensor, so an unsupported kind is named, not ignored


def check_quantization_config(qc: Any, where: str) -> None:
    """Raise ValueError naming the field when `qc` (config.json's quantization_config) is not
    bitsandbytes 4-bit with uint8 storage."""
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                         "(only bitsandbytes 4-bit checkpoints load pre-quantized)")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(f"{where}: quantization_config.load_in_8bit: 8-bit (LLM.int8) checkpoints are not "
                         "supported; use the 16-bit checkpoint, with load_in_4bit=True if memory is short")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"{where}: quantization_config.load_in_4bit is not true; only bitsandbytes 4-bit "
                         "checkpoints are supported")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise ValueError(f"{where}: quantization_config.bnb_4bit_quant_storage {storage!r}: only uint8 "
                         "storage is supported")


def group_4bit_tensors(names: Iterable[str]) -> dict[str, frozenset[str]]:
    """Each 4-bit weight P of a checkpoint -> the names of all its tensors (P included)."""
    owners: dict[str, set[str]] = {}
    for name in names:
        head, sep, tail = name.partition(".weight.")
        if sep and (tail.startswith(STATE_PREFIX) or f".{tail}" in PIECE_SUFFIXES):
            owners.setdefault(head + ".weight", set()).add(name)
    return {weight: frozenset(pieces | {weight}) for weight, pieces in owners.items()}
