"""GPTQ's column sweep, the one both calibrated exports round with: the W4A16 folders (a grid per
group of input columns, `w4a16.py`) and the calibrated GGUF types (k-quant and legacy block
grids, `calibration.py`).

GPTQ (Frantar et al. 2022) minimises a linear layer's output error ||X W^T - X Q^T|| on
calibration inputs X by rounding the columns of W one at a time and spreading each column's
rounding error over the columns not yet rounded, through the upper Cholesky factor U of
(H + damping)^-1, H = X^T X. Updates are lazy: within a block of columns they are applied at
once, and to the columns after it by one matrix product when the block ends.

What differs between formats is only the grid, so that is the caller's `fit(index, values)`:
called once per group of `group` consecutive columns (the unit a format stores one grid for), when
the sweep first reaches a column of it, with those columns' values as compensated so far
([rows, group]); it returns per-column scale and offset ([rows, group] each) of the grid
`value = scale * q + offset`, q an integer in [qmin, qmax] (a zero scale gives code 0), and keeps
whatever the format stores (the caller's headers) itself.

`act_order`: the columns are visited by descending H diagonal (the loudest inputs first, while
most columns are still free to absorb their error), H permuted before it is factored. Grids stay
per group of consecutive columns (the stored layout; "static groups"), each fitted when the first
of its columns is reached -- to the group's values at that moment, which for columns in later
blocks means their value with the lazy updates still pending applied.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

BLOCK = 128          # columns per lazy-update block (rounded to whole groups)

Fit = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def inverse_factor(hessian: torch.Tensor, damp: float, device: torch.device) -> torch.Tensor:
    """U, upper triangular float32 [n, n] with U^T U = (H + damp * mean(diag H) * I)^-1; inputs
    never seen (a zero diagonal) get a unit diagonal first, so their columns round on their own."""
    h = hessian.to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * float(torch.diagonal(h).mean()) * torch.eye(len(h), dtype=torch.float64, device=device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def sweep(w: torch.Tensor, hessian: torch.Tensor, group: int, fit: Fit, qmin: int, qmax: int,
          damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """Codes [rows, cols] (float32 integers in [qmin, qmax]) of w [rows, cols] under H [cols, cols]."""
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"rows of {cols} values are not whole groups of {group}")
    device = w.device
    order = (torch.argsort(torch.diagonal(hessian), descending=True, stable=True).to(device) if act_order
             else torch.arange(cols, device=device))
    position = torch.argsort(order)                   # column -> its place in the sweep
    on = order.to(hessian.device)
    u = inverse_factor(hessian[on][:, on] if act_order else hessian, damp, device)
    weights = w.float()[:, order].clone()
    scale = torch.empty_like(weights)
    offset = torch.empty_like(weights)
    group_of = (order // group).tolist()              # the sweep's place -> its column's group
    fitted: set[int] = set()
    codes = torch.empty_like(weights)
    span = max(1, BLOCK // group) * group
    for start in range(0, cols, span):
        end = min(start + span, cols)
        part = weights[:, start:end].clone()
        errors = torch.zeros_like(part)
        for i in range(end - start):
            col = start + i
            index = group_of[col]
            if index not in fitted:
                places = position[index * group:(index + 1) * group]
                inside = places < end
                values = torch.empty((rows, group), device=device)
                values[:, inside] = part[:, places[inside] - start]
                later = places[~inside]
                values[:, ~inside] = weights[:, later] - errors[:, :i] @ u[start:col, later]
                s, o = fit(index, values)
                scale[:, places], offset[:, places] = s, o
                fitted.add(index)
            s, o = scale[:, col], offset[:, col]
            q = torch.where(s == 0, 0.0, torch.round((part[:, i] - o) / torch.where(s == 0, 1.0, s)))
            q = q.clamp(qmin, qmax)
            codes[:, col] = q
            err = (part[:, i] - (s * q + o)) / u[col, col]
            part[:, i:] -= err[:, None] * u[col, col:end][None, :]
            errors[:, i] = err
        weights[:, end:] -= errors @ u[start:end, end:]
    return codes[:, position]
