"""Bit-identity with bitsandbytes on the CPU (skipped where bitsandbytes cannot run)."""
import pytest
import torch

from velotune.quant import QuantState, dequantize_nf4, quantize_nf4, state_from_tensors, state_to_tensors
from velotune.quant.codes import code_4bit, dynamic_map
from velotune.quant.reference import quantize_blockwise_8bit

F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed (pip install bitsandbytes)")

SHAPES = [(300, 77), (129,), (3, 5, 65), (64 * 256 + 64 * 7 + 3,)]  # short tails, odd counts, >1 nested block
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def _bnb_runs_on_cpu():
    try:
        F.quantize_4bit(torch.randn(64), blocksize=64, compress_statistics=True, quant_type="nf4")
    except Exception as exc:  # the native CPU library may be missing for this platform
        pytest.skip(f"bitsandbytes' CPU backend cannot quantize here: {exc}")


def _bnb_portable_quantize_blockwise(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' own PyTorch-backend kernel (the rule of its CUDA kernel), bypassing the
    native CPU library, whose 65536-bin lookup table only approximates the nearest code."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op.redispatch(keys, values, F.create_dynamic_map(), blocksize)


def _bnb_portable_dequantize_4bit(packed: torch.Tensor, ref) -> torch.Tensor:
    """bitsandbytes' PyTorch-backend 4-bit dequantization. Its native CPU library (0.50) indexes
    absmax per row on AVX-512 machines, which is wrong when a row is not a whole number of
    blocks; the native path is compared separately on shapes where rows are whole blocks."""
    absmax = ref.absmax
    if ref.state2 is not None:
        absmax = F.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    return op.redispatch(keys, packed, absmax, ref.blocksize, ref.quant_type, ref.shape, ref.dtype)


def _from_bnb(ref) -> QuantState:
    nested = ref.state2 is not None
    return QuantState(
        quant_type=ref.quant_type, code=ref.code, absmax=ref.absmax, shape=ref.shape, dtype=ref.dtype,
        blocksize=ref.blocksize, offset=ref.offset.item() if nested else None,
        nested_absmax=ref.state2.absmax if nested else None, nested_code=ref.state2.code if nested else None,
    )


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(code_4bit("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_4bit("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_codes_and_absmax_identical(shape, dtype, quant_type):
    w = _weight(shape, dtype)
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
    packed, state = quantize_nf4(w, quant_type=quant_type, compress_statistics=False)
    assert packed.shape == ref_packed.shape and torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(dequantize_nf4(packed, state), _bnb_portable_dequantize_4bit(ref_packed, ref_state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nested_statistics_identical_to_portable_backend(shape, dtype, quant_type):
    w = _weight(shape, dtype, seed=1)
    _, flat_state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
    offset = flat_state.absmax.mean()
    ref_codes, ref_nested_absmax = _bnb_portable_quantize_blockwise(flat_state.absmax - offset, 256)
    _, state = quantize_nf4(w, quant_type=quant_type)
    assert state.offset == offset.item()
    assert torch.equal(state.absmax, ref_codes)
    assert torch.equal(state.nested_absmax, ref_nested_absmax)
    codes, nested_absmax = quantize_blockwise_8bit(flat_state.absmax - offset)
    assert torch.equal(codes, ref_codes) and torch.equal(nested_absmax, ref_nested_absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nested_state_against_native_cpu_library(quant_type):
    """Everything equal; absmax codes may differ only where the native library's lookup table
    (bins of 2/65535) cannot tell which code is nearer, and ours is the nearer one."""
    w = _weight((1024, 1024), torch.bfloat16, seed=2)  # 64 full nested blocks
    ref_packed, ref = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    packed, state = quantize_nf4(w, quant_type=quant_type)
    assert torch.equal(packed, ref_packed)
    assert state.offset == ref.offset.item()
    assert torch.equal(state.nested_absmax, ref.state2.absmax)
    assert torch.equal(state.nested_code, ref.state2.code) and torch.equal(state.code, ref.code)
    differ = state.absmax != ref.absmax
    assert differ.float().mean() < 0.01
    _, flat = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
    scaled = ((flat.absmax - ref.offset).view(-1, 256) / ref.state2.absmax.view(-1, 1)).view(-1)
    table = dynamic_map()
    ours = (table[state.absmax.long()] - scaled).abs()
    theirs = (table[ref.absmax.long()] - scaled).abs()
    assert torch.all(ours <= theirs)
    assert torch.all(theirs[differ] <= ours[differ] + 2 / 65535 + 1e-7)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(96, 130), (48, 256), (3, 5, 65)])
def test_dequantize_bitsandbytes_state_identical(shape, dtype, quant_type):
    w = _weight(shape, dtype, seed=3)
    ref_packed, ref = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    ours = dequantize_nf4(ref_packed, _from_bnb(ref))
    assert torch.equal(ours, _bnb_portable_dequantize_4bit(ref_packed, ref))
    if shape[-1] % 64 == 0:  # rows are whole blocks: bitsandbytes' native CPU path is right too
        assert torch.equal(ours, F.dequantize_4bit(ref_packed, ref))


@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_checkpoint_tensors_match_as_dict(quant_type, compress_statistics):
    w = _weight((80, 192), torch.bfloat16, seed=4)
    ref_packed, ref = F.quantize_4bit(w, blocksize=64, compress_statistics=compress_statistics, quant_type=quant_type)
    ours = state_to_tensors("layer.weight", ref_packed, _from_bnb(ref))
    theirs = {f"layer.weight.{k}": v for k, v in ref.as_dict(packed=True).items()}
    theirs["layer.weight"] = ref_packed
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # And bitsandbytes reads ours back into the same weight.
    qs = {k.removeprefix("layer.weight."): v for k, v in ours.items() if k != "layer.weight"}
    back = F.QuantState.from_dict(qs, device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(ref_packed, back), F.dequantize_4bit(ref_packed, ref))
    read_packed, read_state = state_from_tensors("layer.weight", theirs)
    assert torch.equal(read_packed, ref_packed)
    assert torch.equal(dequantize_nf4(read_packed, read_state), _bnb_portable_dequantize_4bit(ref_packed, ref))
