"""4-bit group quantization of one linear weight: round-to-nearest, GPTQ, and AWQ's scale search.

All three share one grid per group of `group` input columns of a row: `w ~ (q - zero) * scale`,
q in [-8, 7] (`packing.py`); symmetric grids have zero = 0. The error that counts is the layer's
output error on calibration inputs X, tr(D H D^T) with D = W - deq(Q) and H = X^T X, so every
choice below is judged by H (computed in `serving.py`), never by the weights alone.

- `fit_grid`: min/max of each group (symmetric: the smallest scale whose -8 and 7 ends reach
  the group's extremes), then a shrink of that range (0.50 .. 1.00) chosen per group to minimise
  the output error of the group on its own, d H_g d^T with H_g the group's diagonal block of H
  (or, cheaper, the squared error weighted by H's diagonal) -- AWQ's clipping search. Scales are
  rounded to the dtype they are stored in before the codes are chosen, so what a reader
  dequantizes is exactly what was optimised.
- `gptq`: GPTQ's column sweep (`gptq.py`, Frantar et al. 2022), each group's grid fitted when
  its first column is reached, to the weights as compensated so far; optionally in act order.
- `awq_scales`: per input channel scales s = a^alpha / sqrt(max * min) (a = RMS of the channel's
  input), alpha searched over 0, 0.1, .. 1 for the lowest output error of all linears reading
  that input, each quantized as W diag(s) and read with inputs X diag(1/s) (Lin et al. 2023).
  The caller folds 1/s into whatever produced X (a norm's weight, the rows of up_proj or v_proj).
Everything is torch, on whatever device the weights are: a GPU runs the same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from velotune.export.gptq import sweep
from velotune.export.packing import QMAX, QMIN, dequantize

SHRINKS = tuple(1.0 - i / 20 for i in range(11))     # 1.0 .. 0.5, as AWQ's clipping search
ALPHAS = tuple(i / 10 for i in range(11))


@dataclass
class Quantized:
    """One linear's 4-bit weight: codes int8 [out, in], scale [out, in / group] (storage dtype),
    zero int8 [out, in / group] or None (symmetric)."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero)


def _grid(w: torch.Tensor, symmetric: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., group] float32 -> (scale [...] in `dtype`'s values as float32, zero [...] float32)."""
    if symmetric:   # the grid's ends are -8 s and 7 s: the smallest s reaching both extremes
        peak = torch.maximum(w.amax(dim=-1) / QMAX, w.amin(dim=-1) / QMIN)
        scale = peak.to(dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    lo = w.amin(dim=-1).clamp(max=0.0)
    hi = w.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / (QMAX - QMIN)).to(dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (QMIN - torch.round(lo / scale)).clamp(QMIN, QMAX)
    return scale, zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (torch.round(w / scale[..., None]) + zero[..., None]).clamp(QMIN, QMAX)


def fit_grid(w: torch.Tensor, group: int, symmetric: bool, dtype: torch.dtype,
             importance: torch.Tensor | None = None, shrinks: tuple[float, ...] = SHRINKS
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids of w [out, in] per group: (scale, zero) [out, in / group] float32, scale exactly
    representable in `dtype`. `importance`: how much each column's error counts, [in] (H's
    diagonal: errors weighted one column at a time), or [in / group, group, group] (H's diagonal
    blocks: the output error of a group's error vector d, d H_g d^T, cross terms included)."""
    out, cols = w.shape
    g = w.float().reshape(out, cols // group, group)
    blocks = importance is not None and importance.dim() == 3
    imp = (torch.ones(cols, device=w.device) if importance is None else importance.float())
    imp = imp if blocks else imp.reshape(1, -1, group)
    best_scale = best_zero = best_err = None
    for shrink in shrinks:
        scale, zero = _grid(g * shrink, symmetric, dtype)
        d = (_round(g, scale, zero) - zero[..., None]) * scale[..., None] - g
        err = torch.einsum("ogi,gij,ogj->og", d, imp, d) if blocks else (d ** 2 * imp).sum(dim=-1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def rtn(w: torch.Tensor, group: int, symmetric: bool, dtype: torch.dtype,
        importance: torch.Tensor | None = None, shrinks: tuple[float, ...] = SHRINKS) -> Quantized:
    """Round-to-nearest on fitted grids; `shrinks=(1.0,)`: plain min/max grids, the baseline."""
    scale, zero = fit_grid(w, group, symmetric, dtype, importance, shrinks)
    out, cols = w.shape
    codes = _round(w.float().reshape(out, cols // group, group), scale, zero).reshape(out, cols)
    return _pack(codes, scale, zero, symmetric, dtype)


def _pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool,
          dtype: torch.dtype) -> Quantized:
    return Quantized(codes.to(torch.int8), scale.to(dtype), None if symmetric else zero.to(torch.int8))


def gptq(w: torch.Tensor, hessian: torch.Tensor, group: int, symmetric: bool, dtype: torch.dtype,
         damp: float = 0.01, act_order: bool = False) -> Quantized:
    """GPTQ rounding of w [out, in] under H = X^T X [in, in] (`gptq.sweep`), each group's grid
    fitted (`fit_grid`, H's diagonal as importance) to the weights as compensated so far."""
    out, cols = w.shape
    diag = torch.diagonal(hessian).to(w.device, torch.float32)
    importance = torch.where(diag > 0, diag, torch.ones_like(diag))
    scales = torch.empty((out, cols // group), dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)

    def fit(index: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = fit_grid(values, group, symmetric, dtype, importance[index * group:(index + 1) * group])
        scales[:, index], zeros[:, index] = scale[:, 0], zero[:, 0]
        return scale.expand(-1, group), (-zero * scale).expand(-1, group)

    codes = sweep(w, hessian, group, fit, QMIN, QMAX, damp, act_order)
    return _pack(codes, scales, zeros, symmetric, dtype)


def diagonal_blocks(hessian: torch.Tensor, group: int) -> torch.Tensor:
    """H [in, in] -> its diagonal blocks [in / group, group, group] float32: each group's own
    share of the output error, the clipping search's measure."""
    n = hessian.shape[0] // group
    h = hessian.float().reshape(n, group, n, group)
    return h[torch.arange(n), :, torch.arange(n), :]


def output_error(w: torch.Tensor, q: Quantized, hessian: torch.Tensor, inverse_scale: torch.Tensor | None = None
                 ) -> float:
    """tr(D H D^T), D = w - deq(q) (times diag(1/s) when q quantized W diag(s))."""
    deq = q.dequantized().to(w.device)
    if inverse_scale is not None:
        deq = deq * inverse_scale[None, :]
    d = w.float() - deq
    return float(((d @ hessian.to(d.device, torch.float32)) * d).sum())


def awq_scales(weights: list[torch.Tensor], hessian: torch.Tensor, group: int, symmetric: bool,
               dtype: torch.dtype, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """Per input channel scales [in] (float32) for linears that read one input with H [in, in]:
    the alpha of s = a^alpha with the lowest summed output error after round-to-nearest of
    W diag(s) on min/max grids (the clipping search comes after, on the chosen s, as in AWQ).
    alpha = 0 (s = 1) is among the candidates, so the search never does worse than
    plain rounding on the calibration inputs. `magnitude` [in]: a of each channel when not the
    RMS that H's diagonal gives (heads sharing one v row pool theirs)."""
    h = hessian.to(weights[0].device, torch.float32)
    diag = torch.diagonal(h).float().clamp(min=0)
    magnitude = diag.sqrt() if magnitude is None else magnitude.float()
    magnitude = torch.where(magnitude > 0, magnitude, magnitude[magnitude > 0].min() if (magnitude > 0).any()
                            else torch.ones_like(magnitude))
    best, best_err = torch.ones_like(magnitude), float("inf")
    for alpha in ALPHAS:
        s = magnitude ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = sum(output_error(w, rtn(w.float() * s[None, :], group, symmetric, dtype, shrinks=(1.0,)), h, 1.0 / s)
                  for w in weights)
        if err < best_err:
            best, best_err = s, err
    return best
