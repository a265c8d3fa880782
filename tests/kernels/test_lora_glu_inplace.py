"""The fused LoRA MLP's in-place GLU backward: h over dh, d/dgate over gate, d/dup over up, on the
Triton path (interpreter on CPU) against autograd through the reference GLU in float32."""
import pytest
import torch

from velotune import kernels
from velotune.kernels import glu_backward_inplace
from velotune.kernels.reference import glu_backward_inplace_reference, glu_reference

# Kernel (inputs in `dtype`) vs float32 autograd on the same inputs; as the forward GLU's tests.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def expected(dh, gate, up, activation):
    g, u = (t.detach().float().requires_grad_() for t in (gate, up))
    h = glu_reference(g, u, activation)
    dg, du = torch.autograd.grad(h, (g, u), dh.float())
    return h.detach(), dg, du


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter's numpy sigmoid at -inf tails
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("shape", [(13, 83), (3 * 13, 1031)])
def test_glu_backward_inplace_kernel(device, dtype, activation, shape):
    gate = (torch.randn(shape) * 4).to(device, dtype)
    up = torch.randn(shape).to(device, dtype)
    dh = torch.randn(shape).to(device, dtype)
    h_ref, dg_ref, du_ref = expected(dh, gate, up, activation)
    pointers = dh.data_ptr(), gate.data_ptr(), up.data_ptr()
    glu_backward_inplace(dh, gate, up, activation)
    assert (dh.data_ptr(), gate.data_ptr(), up.data_ptr()) == pointers
    torch.testing.assert_close(dh.float(), h_ref, **TOL[dtype])
    torch.testing.assert_close(gate.float(), dg_ref, **TOL[dtype])
    torch.testing.assert_close(up.float(), du_ref, **TOL[dtype])


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_glu_backward_inplace_reference(activation):
    shape = (7, 45)
    gate, up, dh = torch.randn(shape) * 3, torch.randn(shape), torch.randn(shape)
    h_ref, dg_ref, du_ref = expected(dh, gate, up, activation)
    glu_backward_inplace_reference(dh, gate, up, activation)
    torch.testing.assert_close(dh, h_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gate, dg_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(up, du_ref, atol=1e-6, rtol=1e-6)


def test_glu_backward_inplace_rejects_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        kernels.glu_backward_inplace(x, x.clone(), x.clone(), "relu")
    with pytest.raises(ValueError, match=r"up \(4, 4\)"):
        kernels.glu_backward_inplace(x, x.clone(), x[:, :4].clone(), "silu")
    with pytest.raises(ValueError, match="contiguous"):
        kernels.glu_backward_inplace(x.t(), torch.randn(8, 4), torch.randn(8, 4), "silu")
