"""RMSNorm and the fused residual-add + RMSNorm kernels against the float32 reference."""
import pytest
import torch

from velotune.kernels import add_rms_norm, rms_norm
from velotune.kernels.reference import add_rms_norm_reference, rms_norm_reference

# Kernel (inputs in `dtype`) vs reference computed in float32 from the same inputs.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
EPS = 1e-6


def _grad_fn_name(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__


def _weight(hidden: int, offset: float, dtype, device) -> torch.Tensor:
    # Gemma-style weights (offset 1) sit around 0, Llama-style around 1.
    w = torch.randn(hidden) * 0.2 + (0.0 if offset else 1.0)
    return w.to(device, dtype).requires_grad_()


def _float_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().float().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(1, 7, 67), (3, 13, 129)])
def test_rms_norm_matches_reference(device, dtype, offset, shape):
    x = (torch.randn(shape) * 3).to(device, dtype).requires_grad_()
    w = _weight(shape[-1], offset, dtype, device)
    y = rms_norm(x, w, EPS, offset)
    assert _grad_fn_name(y) == "RMSNormFunctionBackward"
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    y.backward(dy)

    xr, wr = _float_leaves(x, w)
    yr = rms_norm_reference(xr, wr, EPS, offset)
    yr.backward(dy.float())
    torch.testing.assert_close(y.float(), yr, **TOL[dtype])
    torch.testing.assert_close(x.grad.float(), xr.grad, **TOL[dtype])
    # The weight gradient sums over all rows: scale the tolerance with the row count.
    rows = x.numel() // shape[-1]
    torch.testing.assert_close(w.grad.float(), wr.grad, atol=TOL[dtype]["atol"] * rows, rtol=TOL[dtype]["rtol"])


def test_rms_norm_frozen_weight_and_mixed_dtypes(device):
    # Half-precision activations with a float32 weight: output dtype is promoted, like the reference.
    x = torch.randn(2, 5, 33).to(device, torch.float16).requires_grad_()
    w = torch.randn(33, device=device) * 0.1 + 1
    y = rms_norm(x, w, EPS)
    yr = rms_norm_reference(x.detach(), w, EPS)
    assert y.dtype == yr.dtype == torch.float32
    torch.testing.assert_close(y, yr, **TOL[torch.float16])
    y.sum().backward()
    xr = x.detach().float().requires_grad_()
    rms_norm_reference(xr, w, EPS).sum().backward()
    torch.testing.assert_close(x.grad.float(), xr.grad, **TOL[torch.float16])
    assert w.grad is None


def test_rms_norm_of_head_dim_rows(device):
    # Qwen3's q/k norm: a [B, T, H, D] tensor normalised over D.
    x = torch.randn(3, 7, 5, 16, device=device, requires_grad=True)
    w = _weight(16, 0.0, torch.float32, device)
    rms_norm(x, w, EPS).pow(2).sum().backward()
    xr, wr = _float_leaves(x, w)
    rms_norm_reference(xr, wr, EPS).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32])
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm_matches_reference(device, dtype, offset):
    shape = (3, 7, 67)
    x = torch.randn(shape).to(device, dtype).requires_grad_()
    res = (torch.randn(shape) * 2).to(device, dtype).requires_grad_()
    w = _weight(shape[-1], offset, dtype, device)
    y, s = add_rms_norm(x, res, w, EPS, offset)
    assert _grad_fn_name(y) == "AddRMSNormFunctionBackward"
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward([y, s], [dy, ds])

    xr, rr, wr = _float_leaves(x, res, w)
    yr, sr = add_rms_norm_reference(xr, rr, wr, EPS, offset)
    torch.autograd.backward([yr, sr], [dy.float(), ds.float()])
    torch.testing.assert_close(s.float(), sr, **TOL[dtype])
    torch.testing.assert_close(y.float(), yr, **TOL[dtype])
    torch.testing.assert_close(x.grad.float(), xr.grad, **TOL[dtype])
    torch.testing.assert_close(res.grad.float(), rr.grad, **TOL[dtype])
    torch.testing.assert_close(w.grad.float(), wr.grad, atol=TOL[dtype]["atol"] * 21, rtol=TOL[dtype]["rtol"])


def test_rms_norm_rejects_mismatched_weight(device):
    with pytest.raises(ValueError, match=r"weight has shape \(8,\)"):
        rms_norm(torch.randn(2, 9, device=device), torch.ones(8, device=device), EPS)
    with pytest.raises(ValueError, match="same shape and dtype"):
        add_rms_norm(torch.randn(2, 8, device=device), torch.randn(3, 8, device=device), torch.ones(8, device=device), EPS)
