"""Our block quantizers (k-quants and the legacy types' fit/pack split): bytes that gguf-py's
dequantizers read as exactly the values we meant, error bounds on awkward inputs, and
calibration-aware rounding that lowers a layer's output error against round-to-nearest."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q

from velotune.export.blockgrid import LEGACY
from velotune.export.calibration import gptq_quantize
from velotune.export.kquants import K_QUANTS

CODECS = {**K_QUANTS, **LEGACY}
# relative RMS error bound of round-to-nearest on Gaussian weights (measured: q4_K 0.072,
# q5_K 0.036, q6_K 0.018, q4_0 0.087, q4_1 0.078, q5_0 0.047, q5_1 0.038, q8_0 0.006)
BOUNDS = {Q.Q4_K: 0.08, Q.Q5_K: 0.04, Q.Q6_K: 0.02, Q.Q4_0: 0.095, Q.Q4_1: 0.085, Q.Q5_0: 0.05, Q.Q5_1: 0.042,
          Q.Q8_0: 0.007}


def awkward(cols: int = 512) -> np.ndarray:
    """Rows of 2 super-blocks: Gaussian, zeros, constants of both signs, a huge outlier,
    negative-only, small values, one block zero and the next not, positive and far from zero.
    (Values below ~1e-4 put the float16 scales of every GGML type into subnormals: a format limit.)"""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, cols)).astype(np.float32)
    w[1] = 0.0
    w[2] = 1.5
    w[3] = -2.0
    w[4, 7] = 1e4
    w[5] = -np.abs(w[5])
    w[6] *= 1e-3                       # small, but scales still normal float16 numbers
    w[7, :256] = 0.0
    w[8] = np.abs(w[8]) + 3.0          # positive, far from zero (min offset must stay <= 0)
    return w


def decoded(qtype: Q, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return quants.dequantize(data, qtype).reshape(shape)


@pytest.mark.parametrize("qtype", list(CODECS), ids=lambda q: q.name)
def test_packed_bytes_read_back_as_the_grid_values(qtype):
    """Layout: random codes over the whole range on fitted grids, packed, dequantized by gguf-py,
    give scale * q + offset bit for bit (every code bit and header field lands where gguf-py
    reads it)."""
    codec = CODECS[qtype]
    x = awkward().reshape(-1, codec.block)
    grid = codec.fit(x)
    q = np.random.default_rng(1).integers(codec.qmin, codec.qmax + 1, size=x.shape)
    data = codec.pack(q, grid)
    assert data.shape == (len(x), GGML_QUANT_SIZES[qtype][1]) and data.dtype == np.uint8
    assert np.array_equal(quants.dequantize(data, qtype).reshape(x.shape), codec.values(q, grid))


@pytest.mark.parametrize("qtype", list(CODECS), ids=lambda q: q.name)
def test_round_to_nearest_error_on_awkward_rows(qtype):
    codec = CODECS[qtype]
    w = awkward()
    back = decoded(qtype, codec.quantize(w), w.shape)
    assert np.all(np.isfinite(back))
    gauss = np.sqrt(np.mean((back[0] - w[0]) ** 2) / np.mean(w[0] ** 2))
    assert gauss <= BOUNDS[qtype], gauss
    assert np.array_equal(back[1], w[1])                       # zeros stay exactly zero
    assert np.array_equal(back[7, :256], w[7, :256])
    for row in (2, 3):                                           # constants: within float16/6-bit scale error
        assert np.allclose(back[row], w[row], rtol=2e-3), (row, np.unique(back[row]))
    assert back[5].max() <= w[5].max() + 0.1 * np.abs(w[5]).max()  # negative-only: no value pushed up
    assert abs(back[4, 7] - 1e4) <= 1e4 * 2e-3                  # the outlier itself survives
    tiny = np.sqrt(np.mean((back[6] - w[6]) ** 2) / np.mean(w[6] ** 2))
    assert tiny <= 2 * BOUNDS[qtype], tiny                       # no underflow to a useless grid
    shifted = np.sqrt(np.mean((back[8] - w[8]) ** 2) / np.mean(w[8] ** 2))
    assert shifted <= BOUNDS[qtype], shifted


@pytest.mark.parametrize("qtype", list(LEGACY), ids=lambda q: q.name)
def test_legacy_fit_matches_gguf_pys_round_to_nearest(qtype):
    """Our fit/pack split of a legacy type is as good as gguf-py's quantizer (within 2%)."""
    w = np.random.default_rng(2).standard_normal((32, 256)).astype(np.float32)
    ours = decoded(qtype, LEGACY[qtype].quantize(w), w.shape)
    theirs = decoded(qtype, quants.quantize(w, qtype), w.shape)
    assert np.mean((ours - w) ** 2) <= 1.02 * np.mean((theirs - w) ** 2)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_scale_search_beats_plain_min_max(qtype):
    """The weighted least-squares scale search lowers the error of the min/max (absmax) grid."""
    codec = K_QUANTS[qtype]
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    searched = codec.values(codec.round(x, codec.fit(x)), codec.fit(x))
    levels = 16 if qtype == Q.Q4_K else 64
    sub = x.reshape(-1, codec.sub)
    lo = np.minimum(sub.min(1, keepdims=True), 0) if qtype == Q.Q4_K else -np.abs(sub).max(1, keepdims=True)
    hi = sub.max(1, keepdims=True) if qtype == Q.Q4_K else np.abs(sub).max(1, keepdims=True)
    step = (hi - lo) / (levels - 1)
    plain = (np.rint((sub - lo) / step) * step + lo).reshape(x.shape)   # no 6-bit scale rounding even
    assert np.mean((searched - x) ** 2) < np.mean((plain - x) ** 2)


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Activations with unequal channel scales and correlated channels, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    scales = torch.exp(torch.randn(cols, generator=g))
    return (torch.randn(tokens, cols, generator=g) @ mix) * scales


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q4_0], ids=lambda q: q.name)
def test_calibrated_rounding_lowers_layer_output_error(qtype):
    codec = CODECS[qtype]
    cols = 512
    x = correlated_inputs(2048, cols)
    w = np.random.default_rng(4).standard_normal((96, cols)).astype(np.float32) * 0.05
    hessian = (x.double().T @ x.double())
    nearest = decoded(qtype, codec.quantize(w), w.shape)
    calibrated = decoded(qtype, gptq_quantize(w, hessian, codec), w.shape)
    want = x @ torch.from_numpy(w).T

    def output_error(q: np.ndarray) -> float:
        return float(((x @ torch.from_numpy(q).T - want) ** 2).mean())

    assert output_error(calibrated) < 0.7 * output_error(nearest), (output_error(calibrated), output_error(nearest))


def test_calibrated_rounding_with_dead_input_channels():
    """Channels the calibration never activates (zero rows of H) do not break the inverse."""
    codec = K_QUANTS[Q.Q4_K]
    x = correlated_inputs(512, 256)
    x[:, :16] = 0.0
    w = np.random.default_rng(5).standard_normal((8, 256)).astype(np.float32)
    back = decoded(Q.Q4_K, gptq_quantize(w, x.double().T @ x.double(), codec), w.shape)
    assert np.all(np.isfinite(back)) and np.sqrt(np.mean((back - w) ** 2)) < 0.2


def test_gptq_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="rows of 96 values are not whole Q4_K blocks of 256"):
        gptq_quantize(np.zeros((4, 96), np.float32), torch.eye(96, dtype=torch.float64), K_QUANTS[Q.Q4_K])
