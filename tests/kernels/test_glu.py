"""SwiGLU / GeGLU-tanh kernels (forward, and the backward that recomputes the activation)."""
import pytest
import torch

from velotune.kernels import glu
from velotune.kernels.reference import glu_reference

# Kernel (inputs in `dtype`) vs reference computed in float32 from the same inputs.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter's numpy sigmoid at -inf tails
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("shape", [(1, 7, 129), (3, 13, 67)])
def test_glu_matches_reference(device, dtype, activation, shape):
    # Wide gate range: the activations' tails and the region around 0 both matter.
    gate = (torch.randn(shape) * 4).to(device, dtype).requires_grad_()
    up = torch.randn(shape).to(device, dtype).requires_grad_()
    out = glu(gate, up, activation)
    assert type(out.grad_fn).__name__ == "GLUFunctionBackward"
    assert out.dtype == dtype
    dout = torch.randn_like(out)
    out.backward(dout)

    gr, ur = (t.detach().float().requires_grad_() for t in (gate, up))
    ref = glu_reference(gr, ur, activation)
    ref.backward(dout.float())
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    torch.testing.assert_close(gate.grad.float(), gr.grad, **TOL[dtype])
    torch.testing.assert_close(up.grad.float(), ur.grad, **TOL[dtype])


def test_glu_non_contiguous_inputs(device):
    # gate and up as halves of one fused projection (Phi-3's gate_up_proj layout).
    fused = torch.randn(2, 5, 2 * 33, device=device, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)
    glu(gate, up, "silu").pow(2).sum().backward()
    fr = fused.detach().clone().requires_grad_()
    glu_reference(*fr.chunk(2, dim=-1), "silu").pow(2).sum().backward()
    torch.testing.assert_close(fused.grad, fr.grad, **TOL[torch.float32])


def test_glu_rejects_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        glu(x, x, "relu")
    with pytest.raises(ValueError, match="same shape and dtype"):
        glu(x, x[:, :4], "silu")
