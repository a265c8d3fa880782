"""GGML block formats as affine grids, so a quantizer can be split into *fit* and *round*.

Every GGML block type we write stores, per run of `sub` consecutive values of a row, a grid
`value = scale * q + offset` with integer `q` in [qmin, qmax]; blocks of `block` values share one
header (the super-block of the k-quants). A `Codec` says how to `fit` grids to values and how to
`pack` codes and headers into the exact bytes llama.cpp reads. Splitting the two lets calibrated
rounding (`export/calibration.py`) fix a block's grid first and then choose each code itself,
compensating the error of earlier columns, which one fused quantize call cannot.

`scale` and `offset` are computed with the same float32 operations as gguf-py's dequantizers,
so `values(codes, grid)` equals `gguf.quants.dequantize` of the packed bytes bit for bit.

The legacy types (q4_0, q4_1, q5_0, q5_1, q8_0) are here because calibrated rounding needs their
fit/pack split; without calibration the export still quantizes them with gguf-py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
CHUNK_VALUES = 1 << 22   # values fitted at once by `Codec.quantize`


@dataclass
class Grid:
    """Grids of `n` blocks: `scale`/`offset` [n, block // sub], and the header fields `pack` needs
    (each [n, ...])."""
    scale: np.ndarray
    offset: np.ndarray
    header: dict[str, np.ndarray]

    def rows(self, index: np.ndarray | slice) -> Grid:
        return Grid(self.scale[index], self.offset[index], {k: v[index] for k, v in self.header.items()})


def interleave(grids: list[Grid]) -> Grid:
    """Grids fitted group by group along the columns ([rows] blocks each) -> one Grid in the
    row-major block order of the tensor ([rows * groups])."""
    def join(arrays: list[np.ndarray]) -> np.ndarray:
        stacked = np.stack(arrays, axis=1)
        return stacked.reshape(-1, *stacked.shape[2:])
    return Grid(join([g.scale for g in grids]), join([g.offset for g in grids]),
                {k: join([g.header[k] for g in grids]) for k in grids[0].header})


class Codec:
    """One GGML block type: grid fitting and byte packing."""
    qtype: Q
    block: int      # values per block (one header)
    sub: int        # values per (scale, offset) pair
    qmin: int
    qmax: int

    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> Grid:
        """Grids for blocks `x` [n, block] float32; `weights` (same shape, >= 0) say how much the
        error of each value matters."""
        raise NotImplementedError

    def pack(self, q: np.ndarray, grid: Grid) -> np.ndarray:
        """Codes [n, block] (ints in [qmin, qmax]) and their grids -> bytes [n, type size]."""
        raise NotImplementedError

    def round(self, x: np.ndarray, grid: Grid) -> np.ndarray:
        """Nearest codes of `x` [n, block] on the grids (a zero scale gives code 0)."""
        scale = np.repeat(grid.scale, self.sub, axis=1)
        offset = np.repeat(grid.offset, self.sub, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scale == 0, 0, np.rint((x - offset) / scale))
        return np.clip(q, self.qmin, self.qmax).astype(np.int32)

    def values(self, q: np.ndarray, grid: Grid) -> np.ndarray:
        """What a reader dequantizes: scale * q + offset, [n, block] float32."""
        n = q.shape[0]
        q = q.reshape(n, -1, self.sub).astype(np.float32)
        return (grid.scale[..., None] * q + grid.offset[..., None]).reshape(n, self.block)

    def quantize(self, w: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Round-to-nearest on fitted grids: a [..., cols] float32 tensor (a matrix, or stacked
        experts) -> GGUF tensor bytes."""
        *lead, cols = w.shape
        x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, self.block)
        wt = None if weights is None else np.broadcast_to(weights, w.shape).reshape(-1, self.block)
        data = np.empty((len(x), GGML_QUANT_SIZES[self.qtype][1]), np.uint8)
        for start in range(0, len(x), CHUNK_VALUES // self.block):  # bounded temporaries for big tensors
            part = slice(start, start + CHUNK_VALUES // self.block)
            grid = self.fit(x[part], None if wt is None else wt[part])
            data[part] = self.pack(self.round(x[part], grid), grid)
        return data.reshape(*lead, cols // self.block * GGML_QUANT_SIZES[self.qtype][1])


def f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 1] float32 -> (float32 value of its float16 rounding [n, 1], the two bytes [n, 2])."""
    h = np.ascontiguousarray(x, dtype=np.float32).astype(np.float16)
    return h.astype(np.float32), h.view(np.uint8)


def nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0x0F) | (hi.astype(np.uint8) << 4)


def high_bits(q: np.ndarray, bit: int = 4) -> np.ndarray:
    """Bit `bit` of each of 32 codes, as 4 little-endian bytes (q5_0/q5_1's qh)."""
    return np.packbits(((q >> bit) & 1).astype(np.uint8), axis=-1, bitorder="little")


class Symmetric(Codec):
    """q4_0, q5_0, q8_0: value = d * q, d chosen so the largest magnitude lands on the grid's
    end (q4_0/q5_0 put it on the negative end, one step wider, as llama.cpp does)."""
    block = sub = 32

    def __init__(self, qtype: Q, bits: int) -> None:
        self.qtype = qtype
        self.bits = bits
        self.qmin, self.qmax = (-127, 127) if bits == 8 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)

    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> Grid:
        i = np.abs(x).argmax(axis=1, keepdims=True)
        peak = np.take_along_axis(x, i, axis=1)
        d = np.abs(peak) / 127 if self.bits == 8 else peak / self.qmin
        value, raw = f16(d)
        return Grid(value, np.zeros_like(value), {"d": raw})

    def pack(self, q: np.ndarray, grid: Grid) -> np.ndarray:
        d = grid.header["d"]
        if self.bits == 8:
            return np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=1)
        u = (q - self.qmin).astype(np.uint8)
        low = nibbles(u[:, :16], u[:, 16:])
        if self.bits == 4:
            return np.concatenate([d, low], axis=1)
        return np.concatenate([d, high_bits(u), low], axis=1)


class WithMin(Codec):
    """q4_1, q5_1: value = d * q + m, spanning the block's min..max."""
    block = sub = 32

    def __init__(self, qtype: Q, bits: int) -> None:
        self.qtype, self.bits = qtype, bits
        self.qmin, self.qmax = 0, (1 << bits) - 1

    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> Grid:
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        d, d_raw = f16((hi - lo) / self.qmax)
        m, m_raw = f16(lo)
        return Grid(d, m, {"d": d_raw, "m": m_raw})

    def pack(self, q: np.ndarray, grid: Grid) -> np.ndarray:
        u = q.astype(np.uint8)
        low = nibbles(u[:, :16], u[:, 16:])
        head = [grid.header["d"], grid.header["m"]]
        return np.concatenate(head + ([low] if self.bits == 4 else [high_bits(u), low]), axis=1)


LEGACY: dict[Q, Codec] = {
    Q.Q4_0: Symmetric(Q.Q4_0, 4), Q.Q5_0: Symmetric(Q.Q5_0, 5), Q.Q8_0: Symmetric(Q.Q8_0, 8),
    Q.Q4_1: WithMin(Q.Q4_1, 4), Q.Q5_1: WithMin(Q.Q5_1, 5),
}
