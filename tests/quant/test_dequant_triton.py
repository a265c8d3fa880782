"""The Triton dequantization kernel against the reference, bit for bit (interpreter on CPU)."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from velotune.quant.dequant_triton import BLOCK, dequantize_4bit_triton  # noqa: E402
from velotune.quant.nf4 import quantize_nf4  # noqa: E402
from velotune.quant.reference import dequantize_4bit_reference  # noqa: E402

# Odd counts, short last blocks, more than one program (BLOCK), more than one nested block.
SIZES = [(1,), (3, 7), (129,), (5, 2 * BLOCK + 3), (64 * 256 + 64 * 3 + 17,)]


@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SIZES)
def test_kernel_equals_reference(shape, dtype, quant_type, compress_statistics, device):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    w = (torch.randn(shape, generator=g) * 3).to(dtype)
    packed, state = quantize_nf4(w, quant_type=quant_type, compress_statistics=compress_statistics)
    expected = dequantize_4bit_reference(packed, state)
    got = dequantize_4bit_triton(packed.to(device), state.to(device))
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_kernel_equals_reference_at_other_block_sizes(blocksize, device):
    """The block sizes are compile-time constants of the kernel: each size is its own compilation."""
    w = torch.randn(7, 3 * blocksize + 5, generator=torch.Generator().manual_seed(blocksize)).to(torch.bfloat16)
    for compress_statistics in (True, False):
        packed, state = quantize_nf4(w, blocksize=blocksize, compress_statistics=compress_statistics)
        got = dequantize_4bit_triton(packed.to(device), state.to(device))
        assert torch.equal(got.cpu(), dequantize_4bit_reference(packed, state))


def test_kernel_checks_sizes(device):
    packed, state = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="needs 128"):
        dequantize_4bit_triton(packed[:100].to(device), state.to(device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="forcing the kernel onto CPU tensors needs the interpreter")
def test_dispatch_takes_the_kernel_when_forced(monkeypatch):
    from velotune.kernels.dispatch import force_triton
    from velotune.quant import dequant_triton, dequantize_nf4

    calls = []
    real = dequant_triton.dequantize_4bit_triton
    monkeypatch.setattr(dequant_triton, "dequantize_4bit_triton", lambda p, s: calls.append(1) or real(p, s))
    packed, state = quantize_nf4(torch.randn(3, 100))
    assert torch.equal(dequantize_nf4(packed, state), dequantize_4bit_reference(packed, state)) and not calls
    with force_triton():
        assert torch.equal(dequantize_nf4(packed, state), dequantize_4bit_reference(packed, state))
    assert calls == [1]
