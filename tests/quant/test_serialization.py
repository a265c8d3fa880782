"""bitsandbytes checkpoint layout: round trips through safetensors, and refusals that name the tensor."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from velotune.quant import QuantFormatError, dequantize_nf4, quantize_nf4, state_from_tensors, state_to_tensors

PREFIX = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def nested():
    packed, state = quantize_nf4(torch.randn(96, 200, generator=torch.Generator().manual_seed(0)).bfloat16())
    return state_to_tensors(PREFIX, packed, state), packed, state


@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_through_safetensors(tmp_path, quant_type, compress_statistics):
    w = torch.randn(48, 130, generator=torch.Generator().manual_seed(1)).half()
    packed, state = quantize_nf4(w, quant_type=quant_type, compress_statistics=compress_statistics)
    tensors = state_to_tensors(PREFIX, packed, state)
    suffixes = {k.removeprefix(PREFIX) for k in tensors}
    expected = {"", ".absmax", ".quant_map", f".quant_state.bitsandbytes__{quant_type}"}
    if compress_statistics:
        expected |= {".nested_absmax", ".nested_quant_map"}
    assert suffixes == expected
    save_file({**tensors, "lm_head.weight": torch.zeros(2, 2)}, tmp_path / "m.safetensors")
    back_packed, back = state_from_tensors(PREFIX, load_file(tmp_path / "m.safetensors"))
    assert torch.equal(back_packed, packed)
    assert (back.shape, back.dtype, back.blocksize, back.quant_type, back.offset) == (
        state.shape, state.dtype, state.blocksize, state.quant_type, state.offset)
    assert torch.equal(dequantize_nf4(back_packed, back), dequantize_nf4(packed, state))


def test_meta_json(nested):
    tensors, _, state = nested
    meta = json.loads(bytes(tensors[f"{PREFIX}.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta == {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [96, 200],
                    "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": state.offset}


def _meta_tensor(meta):
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def _edit_meta(tensors, **changes):
    key = f"{PREFIX}.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(tensors[key].tolist()))
    meta.update(changes)
    return {**tensors, key: _meta_tensor(meta)}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: {k: v for k, v in t.items() if k != f"{PREFIX}.nested_absmax"},
         f"{PREFIX}.nested_absmax: missing"),
        (lambda t: {k: v for k, v in t.items() if "quant_state" not in k},
         f"{PREFIX}: expected one tensor {PREFIX}.quant_state.bitsandbytes__<nf4|fp4>, found none"),
        (lambda t: {**t, PREFIX: t[PREFIX].view(-1).view(torch.int16).view(-1, 1)},
         f"{PREFIX}: packed 4-bit codes stored as torch.int16"),
        (lambda t: {**t, f"{PREFIX}.absmax": t[f"{PREFIX}.absmax"][:-1]},
         f"{PREFIX}.absmax: 299 elements; 19200 weights in blocks of 64 needs 300"),
        (lambda t: {**t, f"{PREFIX}.quant_map": t[f"{PREFIX}.quant_map"].half()},
         f"{PREFIX}.quant_map: expected float32 \\[16\\]"),
        (lambda t: {**t, f"{PREFIX}.nested_quant_map": t[f"{PREFIX}.nested_quant_map"][:16]},
         f"{PREFIX}.nested_quant_map: expected float32 \\[256\\]"),
        (lambda t: {**t, f"{PREFIX}.absmax": t[f"{PREFIX}.absmax"].float()},
         f"{PREFIX}.absmax: torch.float32; a nested 4-bit weight stores uint8 codes"),
        (lambda t: {**t, f"{PREFIX}.quant_state.bitsandbytes__int4": torch.zeros(2, dtype=torch.uint8)},
         "expected one tensor .*found .*bitsandbytes__nf4, .*bitsandbytes__int4"),
        (lambda t: {**t, f"{PREFIX}.scb": torch.zeros(2)}, f"{PREFIX}.scb: unexpected tensor"),
        (lambda t: _edit_meta(t, shape=[96, 201]), f"{PREFIX}: 9600 elements; shape \\[96, 201\\]"),
        (lambda t: _edit_meta(t, blocksize=48), "bitsandbytes__nf4: blocksize 48"),
        (lambda t: _edit_meta(t, dtype="float64"), "bitsandbytes__nf4: dtype 'float64'"),
        (lambda t: _edit_meta(t, nested_dtype="float16"), "bitsandbytes__nf4: nested_dtype 'float16'"),
        (lambda t: _edit_meta(t, quant_type="fp4"), "bitsandbytes__nf4: JSON says quant_type 'fp4'"),
        (lambda t: {**t, f"{PREFIX}.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)},
         "bitsandbytes__nf4: not valid UTF-8 JSON"),
    ],
)
def test_unsupported_layouts_name_the_tensor(nested, mutate, message):
    tensors, _, _ = nested
    with pytest.raises(QuantFormatError, match=message):
        state_from_tensors(PREFIX, mutate(tensors))


def test_other_weights_are_ignored(nested):
    tensors, packed, _ = nested
    other = state_to_tensors(PREFIX.replace("down", "up"), packed, nested[2])
    back, _ = state_from_tensors(PREFIX, {**tensors, **other})
    assert torch.equal(back, packed)
