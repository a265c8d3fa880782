"""The reference quantizer on its own: packing, exact grid points, error bounds, bad input."""
import pytest
import torch

from velotune.quant import dequantize_nf4, quantize_nf4
from velotune.quant.codes import code_4bit, dynamic_map


def test_two_codes_per_byte_first_in_high_nibble():
    w = torch.tensor([1.0, -1.0, 0.0])
    packed, state = quantize_nf4(w, compress_statistics=False)
    # NF4: 1.0 -> 15, -1.0 -> 0, 0.0 -> 7; the odd count is padded with the code of 0.0.
    assert packed.tolist() == [[0xF0], [0x77]]
    assert state.absmax.tolist() == [1.0]
    packed, _ = quantize_nf4(torch.tensor([1.0, -1.0, 0.5]), quant_type="fp4", compress_statistics=False)
    # FP4 (unsorted table): 1.0 -> 3, -1.0 -> 11, 0.5 -> 5, padding 0.0 -> 0.
    assert packed.tolist() == [[0x3B], [0x50]]


def test_tables():
    nf4, fp4, dyn = code_4bit("nf4"), code_4bit("fp4"), dynamic_map()
    assert nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1 and torch.all(nf4[1:] > nf4[:-1])
    assert fp4.tolist()[:8] == pytest.approx([0, 0.0625 / 12, 8 / 12, 1, 4 / 12, 6 / 12, 2 / 12, 3 / 12])
    assert torch.equal(fp4[9:], -fp4[1:8])
    assert dyn.shape == (256,) and dyn[-1] == 1 and 0 in dyn.tolist() and torch.all(dyn[1:] > dyn[:-1])
    assert dyn[0].item() == pytest.approx(-0.99297, abs=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_grid_points_survive_exactly(quant_type):
    table = code_4bit(quant_type)
    scales = torch.tensor([0.5, 2.0, 0.03125])  # powers of two: products are exact in float32
    w = (table.repeat(4).view(1, 64) * scales.view(3, 1)).view(-1)[:-5]  # last block short
    packed, state = quantize_nf4(w, quant_type=quant_type, compress_statistics=False)
    assert torch.equal(dequantize_nf4(packed, state), w)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_error_within_half_a_code_step(quant_type, compress_statistics):
    w = torch.randn(71, 333, generator=torch.Generator().manual_seed(0))  # odd count, 370 blocks, last short
    packed, state = quantize_nf4(w, quant_type=quant_type, compress_statistics=compress_statistics)
    assert packed.shape == (71 * 333 // 2 + 1, 1) and packed.dtype == torch.uint8
    back = dequantize_nf4(packed, state)
    assert back.shape == w.shape and back.dtype == w.dtype
    flat = torch.nn.functional.pad(w.view(-1), (0, -w.numel() % 64)).view(-1, 64)
    true_absmax = flat.abs().amax(1)
    sorted_table = code_4bit(quant_type).sort().values
    half_gap = (sorted_table[1:] - sorted_table[:-1]).max() / 2
    absmax = state.absmax_float()
    if compress_statistics:
        assert state.offset == pytest.approx(true_absmax.mean().item(), rel=1e-6)
        assert state.nested_absmax.shape == (2,)  # 370 absmax codes in blocks of 256
        dyn = dynamic_map()
        dyn_half_gap = (dyn[1:] - dyn[:-1]).max() / 2
        assert torch.all((absmax - true_absmax).abs() <= dyn_half_gap * state.nested_absmax.max() * 1.0001)
    else:
        assert torch.equal(absmax, true_absmax)
    err = (torch.nn.functional.pad((back - w).view(-1), (0, -w.numel() % 64)).view(-1, 64)).abs()
    bound = half_gap * absmax.view(-1, 1) + (absmax - true_absmax).abs().view(-1, 1) + 1e-6
    assert torch.all(err <= bound)
    assert err.mean() < 0.1 * true_absmax.mean()


def test_zero_block_stays_zero():
    w = torch.zeros(128, dtype=torch.bfloat16)
    w[64:] = torch.linspace(-1, 1, 64)
    packed, state = quantize_nf4(w)
    out = dequantize_nf4(packed, state)
    assert torch.all(out[:64] == 0) and torch.allclose(out[64:].float(), w[64:].float(), atol=0.15)


@pytest.mark.parametrize(
    ("kwargs", "weight", "message"),
    [
        ({"quant_type": "int4"}, torch.ones(64), "quant_type"),
        ({"blocksize": 48}, torch.ones(64), "blocksize"),
        ({}, torch.ones(64, dtype=torch.int32), "torch.int32"),
        ({}, torch.ones(0), "empty"),
    ],
)
def test_bad_arguments(kwargs, weight, message):
    with pytest.raises(ValueError, match=message):
        quantize_nf4(weight, **kwargs)


def test_dequantize_rejects_mismatched_codes():
    packed, state = quantize_nf4(torch.randn(10, 64))
    with pytest.raises(ValueError, match="has 319 bytes; shape \\(10, 64\\) needs 320"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(ValueError, match="must be uint8"):
        dequantize_nf4(packed.to(torch.int16), state)
