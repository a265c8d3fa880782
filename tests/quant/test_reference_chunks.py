"""Quantizing a chunk of blocks at a time (the workspace bound of load_in_4bit) gives exactly the
codes and scales of quantizing the whole weight at once."""
from __future__ import annotations

import pytest
import torch

from velotune.quant import reference


@pytest.mark.parametrize("numel", [64 * 7, 64 * 7 + 33, 64 * 7 + 1])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_chunked_quantization_equals_whole(monkeypatch, numel, quant_type):
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3
    monkeypatch.setattr(reference, "QUANTIZE_CHUNK", 1 << 20)
    whole, whole_state = reference.quantize_4bit_reference(weight, quant_type=quant_type)
    monkeypatch.setattr(reference, "QUANTIZE_CHUNK", 128)   # 2 blocks per chunk, a short last chunk
    chunked, chunked_state = reference.quantize_4bit_reference(weight, quant_type=quant_type)
    assert torch.equal(whole, chunked)
    assert torch.equal(whole_state.absmax, chunked_state.absmax)
    assert torch.equal(whole_state.nested_absmax, chunked_state.nested_absmax)
    assert whole_state.offset == chunked_state.offset
