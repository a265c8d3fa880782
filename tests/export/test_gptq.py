"""The GPTQ column sweep both calibrated exports share (`export/gptq.py`): it is round-to-nearest
when the inputs are uncorrelated, it lowers the output error when they are not (in column and in
act order), its grids are fitted once per group to the compensated weights, and act order keeps
each group's grid on its own consecutive columns."""
from __future__ import annotations

import pytest
import torch

from velotune.export.gptq import sweep


def fixed_grid(step: float, calls: list[tuple[int, torch.Tensor]]):
    """A grid of `step` around zero for every group (codes -8..7), recording each call."""
    def fit(index: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((index, values.clone()))
        return torch.full_like(values, step), torch.zeros_like(values)
    return fit


def correlated(tokens: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols ** 0.5
    return (torch.randn(tokens, cols, generator=g) @ mix) * torch.exp(torch.randn(cols, generator=g))


@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_round_to_nearest(act_order):
    """With a diagonal H no error can be moved to another column, so every code is the nearest."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 96, generator=g)
    h = torch.diag(torch.rand(96, generator=g, dtype=torch.float64) + 0.5)
    calls: list = []
    codes = sweep(w, h, 32, fixed_grid(0.25, calls), -8, 7, act_order=act_order)
    assert torch.equal(codes, torch.round(w / 0.25).clamp(-8, 7))
    assert sorted(i for i, _ in calls) == [0, 1, 2]


@pytest.mark.parametrize("act_order", [False, True])
def test_sweep_lowers_output_error(act_order):
    x = correlated(1024, 128, 1)
    h = (x.T @ x).double()
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2)) * 0.2
    codes = sweep(w, h, 32, fixed_grid(0.1, []), -8, 7, act_order=act_order)
    nearest = torch.round(w / 0.1).clamp(-8, 7)

    def error(c: torch.Tensor) -> float:
        return float(((x @ (w - 0.1 * c).T) ** 2).sum())

    assert error(codes) < 0.8 * error(nearest), (error(codes), error(nearest))


def test_act_order_fits_each_group_once_on_compensated_values():
    """In act order the loudest input is rounded first; the grid of a group not yet reached is
    fitted later, to values its columns have by then (the first columns' errors spread onto them),
    and covers exactly that group's own columns."""
    x = correlated(512, 64, 3)
    x[:, 40] *= 50.0                                   # group 2 (columns 32..47 of 16-wide groups) is loudest
    h = (x.T @ x).double()
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    calls: list = []
    sweep(w, h, 16, fixed_grid(0.2, calls), -8, 7, act_order=True)
    order = [i for i, _ in calls]
    assert order[0] == 2 and sorted(order) == [0, 1, 2, 3]
    assert torch.equal(calls[0][1], w[:, 32:48])        # nothing rounded before the first grid
    later = dict(calls)
    assert any(not torch.allclose(later[i], w[:, 16 * i:16 * (i + 1)]) for i in (0, 1, 3))


def test_rows_must_be_whole_groups():
    with pytest.raises(ValueError, match="rows of 40 values are not whole groups of 16"):
        sweep(torch.zeros(2, 40), torch.eye(40, dtype=torch.float64), 16, fixed_grid(1.0, []), -8, 7)
