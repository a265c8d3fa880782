"""Q4_K, Q5_K and Q6_K quantizers in numpy, vectorized over blocks.

Our own because gguf-py (0.19) can dequantize the k-quants but its `gguf.quants.quantize` raises
NotImplementedError for them, and llama.cpp's quantizer is C (we write GGUF without building or
shelling out to llama.cpp). The byte layouts follow ggml's block_q4_K / block_q5_K / block_q6_K;
tests check them against gguf-py's dequantizers, our loader and llama.cpp itself.

The formats (256 values per super-block):
- q4_K / q5_K: 8 sub-blocks of 32, each `value = d*sc*q - dmin*m` with 6-bit `sc`, `m` and a
  4/5-bit `q`; `d`, `dmin` float16 per super-block.
- q6_K: 16 sub-blocks of 16, `value = d*sc*q`, int8 `sc`, 6-bit signed `q`; `d` float16.

Scale search: plain min/max (or absmax) scales waste levels on the block's extremes, so each
sub-block tries a few candidate inverse scales around the min/max one, fits scale (and min) to
the resulting codes by weighted least squares, and keeps the fit with the lowest weighted
squared error -- the idea of llama.cpp's k-quant quantizers, written from the format description.
The weights favour large values (sqrt(mean square + x^2)), times a per-column importance when
calibration gives one (mean squared activation of the input channel, like llama.cpp's imatrix).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from velotune.export.blockgrid import Codec, Grid, f16, nibbles

Q = GGMLQuantizationType
QK_K = 256
STEPS = np.arange(-10, 11) * 0.1   # candidate inverse scales: (levels + step) / range


def value_weights(x: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """How much each value's error counts: larger values more, times the caller's importance."""
    mean_sq = np.mean(x * x, axis=-1, keepdims=True)
    w = np.sqrt(mean_sq + x * x)
    return w if weights is None else w * weights


def fit_scale_min(x: np.ndarray, w: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [N, sub]: (scale >= 0, offset <= 0) of `value = scale*q + offset`,
    q in 0..levels, minimizing the weighted squared error over candidate code assignments."""
    lo = np.minimum(x.min(axis=1), 0.0)   # the offset is stored as a non-negative -min
    span = x.max(axis=1) - lo
    flat = span <= 0
    safe_span = np.where(flat, 1.0, span)
    best_s, best_o = np.where(flat, 0.0, span / levels), lo
    best_err = np.sum(w * (np.clip(np.rint((x - lo[:, None]) / np.where(flat, 1.0, best_s)[:, None]), 0, levels)
                           * best_s[:, None] + lo[:, None] - x) ** 2, axis=1)
    sw = w.sum(axis=1)
    sx = (w * x).sum(axis=1)
    for step in STEPS:
        q = np.clip(np.rint((x - lo[:, None]) * ((levels + step) / safe_span)[:, None]), 0, levels)
        sq, sqq, sqx = (w * q).sum(axis=1), (w * q * q).sum(axis=1), (w * q * x).sum(axis=1)
        det = sw * sqq - sq * sq
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (sw * sqx - sq * sx) / det
            o = (sqq * sx - sq * sqx) / det
            positive = o > 0                      # offset must stay <= 0: refit the scale alone
            s = np.where(positive, sqx / sqq, s)
            o = np.where(positive, 0.0, o)
        ok = (det > 0) & np.isfinite(s) & (s >= 0) & ~flat
        err = np.sum(w * (q * s[:, None] + o[:, None] - x) ** 2, axis=1)
        better = ok & (err < best_err)
        best_s, best_o, best_err = np.where(better, s, best_s), np.where(better, o, best_o), np.where(better, err, best_err)
    return best_s.astype(np.float32), best_o.astype(np.float32)


def fit_symmetric(x: np.ndarray, w: np.ndarray, levels: int) -> np.ndarray:
    """Per row of x [N, sub]: the scale of `value = scale*q`, q in -levels..levels-1, minimizing
    the weighted squared error over candidate code assignments (scale may be negative: the
    largest magnitude maps to -levels, the end with one more step)."""
    i = np.abs(x).argmax(axis=1)
    peak = x[np.arange(len(x)), i]
    zero = peak == 0
    safe_peak = np.where(zero, 1.0, peak)
    best_s = np.where(zero, 0.0, peak / -levels)
    best_err = np.full(len(x), np.inf)
    for step in (0.0, *STEPS):
        q = np.clip(np.rint(x * (-(levels + step) / safe_peak)[:, None]), -levels, levels - 1)
        sqq, sqx = (w * q * q).sum(axis=1), (w * q * x).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = sqx / sqq
        ok = (sqq > 0) & ~zero
        err = np.sum(w * (q * s[:, None] - x) ** 2, axis=1)
        better = ok & (err < best_err)
        best_s, best_err = np.where(better, s, best_s), np.where(better, err, best_err)
    return best_s.astype(np.float32)


def six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative per-sub-block values [n, 8] -> (super-block step [n, 1], 6-bit codes [n, 8])."""
    step = values.max(axis=1, keepdims=True) / 63
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(step > 0, np.rint(values / step), 0)
    return step, np.clip(codes, 0, 63).astype(np.uint8)


class ScaleMinK(Codec):
    """q4_K (4-bit codes) and q5_K (5-bit)."""
    block, sub, qmin = QK_K, 32, 0

    def __init__(self, qtype: Q, bits: int) -> None:
        self.qtype, self.bits, self.qmax = qtype, bits, (1 << bits) - 1

    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> Grid:
        n = x.shape[0]
        w = value_weights(x, weights).reshape(-1, self.sub)
        s, o = fit_scale_min(x.reshape(-1, self.sub).astype(np.float64), w, self.qmax)
        d, sc = six_bit(s.reshape(n, 8))
        dmin, m = six_bit(-o.reshape(n, 8))
        d, d_raw = f16(d)
        dmin, dmin_raw = f16(dmin)
        return Grid(d * sc.astype(np.float32), -(dmin * m.astype(np.float32)),
                    {"d": d_raw, "dmin": dmin_raw, "sc": sc, "m": m})

    def pack(self, q: np.ndarray, grid: Grid) -> np.ndarray:
        sc, m = grid.header["sc"], grid.header["m"]
        scales = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
                                 (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                                 (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1).astype(np.uint8)
        u = q.astype(np.uint8).reshape(-1, 4, 2, 32)        # pairs of sub-blocks share 32 bytes
        low = nibbles(u[:, :, 0], u[:, :, 1]).reshape(-1, 128)
        parts = [grid.header["d"], grid.header["dmin"], scales]
        if self.bits == 5:                                   # bit 4 of sub-block j -> bit j of qh
            top = ((u.reshape(-1, 8, 32) >> 4) & 1).astype(np.uint8)
            parts.append(np.bitwise_or.reduce(top << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
        return np.concatenate([*parts, low], axis=1)


class SixBitK(Codec):
    """q6_K."""
    qtype, block, sub, qmin, qmax = Q.Q6_K, QK_K, 16, -32, 31

    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> Grid:
        n = x.shape[0]
        w = value_weights(x, weights).reshape(-1, self.sub)
        s = fit_symmetric(x.reshape(-1, self.sub).astype(np.float64), w, 32).reshape(n, 16)
        peak = np.take_along_axis(s, np.abs(s).argmax(axis=1)[:, None], axis=1)
        d = peak / -128
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.clip(np.where(d != 0, np.rint(s / d), 0), -128, 127).astype(np.int8)
        d, d_raw = f16(d)
        return Grid(d * sc.astype(np.float32), np.zeros((n, 16), np.float32), {"d": d_raw, "sc": sc})

    def pack(self, q: np.ndarray, grid: Grid) -> np.ndarray:
        u = (q + 32).astype(np.uint8).reshape(-1, 2, 128)   # two halves of 128 values
        low = nibbles(u[:, :, :64], u[:, :, 64:]).reshape(-1, 128)
        quarters = ((u.reshape(-1, 2, 4, 32) >> 4) & 3) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
        high = np.bitwise_or.reduce(quarters, axis=2).reshape(-1, 64)
        return np.concatenate([low, high, grid.header["sc"].view(np.uint8), grid.header["d"]], axis=1)


K_QUANTS: dict[Q, Codec] = {Q.Q4_K: ScaleMinK(Q.Q4_K, 4), Q.Q5_K: ScaleMinK(Q.Q5_K, 5), Q.Q6_K: SixBitK()}
