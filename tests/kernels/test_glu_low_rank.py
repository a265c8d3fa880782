"""The fused LoRA MLP's GLU with the adapters' low-rank terms added inside the kernel, forward and
in-place backward, on the Triton path (interpreter on CPU) against float32 autograd through the
reference GLU of the completed tensors."""
import pytest
import torch

from velotune import kernels
from velotune.kernels import LowRank
from velotune.kernels.reference import glu_backward_inplace_reference, glu_low_rank_reference, glu_reference

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
# (rows, cols, rank): odd sizes, a rank below the tensor cores' 16 and one that is not a power of 2
CASES = [(13, 83, 8), (77, 203, 12), (130, 131, 16)]


def terms(rows, cols, rank, device, dtype, stacked_with=0):
    """A gate-like term as the fused MLP builds it: xa a column slice of a wider stacked X A^T
    (when `stacked_with` > 0) and right = B^T, a transposed view."""
    xa_all = torch.randn(rows, rank + stacked_with).to(device, dtype)
    b = (torch.randn(cols, rank) / rank ** 0.5).to(device, dtype)
    return LowRank(xa_all[:, stacked_with:], b.t(), 0.75)


def full(t, term):
    return t.float() if term is None else t.float() + term.scale * (term.xa.float() @ term.right.float())


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("rows,cols,rank", CASES)
@pytest.mark.parametrize("which", ["both", "gate", "up"])
def test_forward_matches_the_completed_glu(device, dtype, activation, rows, cols, rank, which):
    gate = (torch.randn(rows, cols) * 3).to(device, dtype)
    up = torch.randn(rows, cols).to(device, dtype)
    gt = terms(rows, cols, rank, device, dtype, stacked_with=5) if which in ("both", "gate") else None
    ut = terms(rows, cols, rank, device, dtype) if which in ("both", "up") else None
    out = kernels.glu_low_rank(gate, up, activation, gt, ut)
    expected = glu_reference(full(gate, gt), full(up, ut), activation)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("rows,cols,rank", CASES)
@pytest.mark.parametrize("present", [("gate", "up", "dh"), ("dh",), ("gate",)])
def test_backward_inplace_matches_autograd(device, dtype, activation, rows, cols, rank, present):
    gate = (torch.randn(rows, cols) * 3).to(device, dtype)
    up = torch.randn(rows, cols).to(device, dtype)
    dh = torch.randn(rows, cols).to(device, dtype)
    gt = terms(rows, cols, rank, device, dtype, stacked_with=rank) if "gate" in present else None
    ut = terms(rows, cols, rank, device, dtype) if "up" in present else None
    # dh's term: d(h A^T) [rows, r] @ A [r, cols], A contiguous as the adapter stores it
    dt = LowRank(torch.randn(rows, rank).to(device, dtype), (torch.randn(rank, cols) / rank ** 0.5).to(device, dtype),
                 1.0) if "dh" in present else None
    g, u = full(gate, gt).requires_grad_(), full(up, ut).requires_grad_()
    h = glu_reference(g, u, activation)
    dg, du = torch.autograd.grad(h, (g, u), full(dh, dt))
    pointers = dh.data_ptr(), gate.data_ptr(), up.data_ptr()
    kernels.glu_backward_inplace(dh, gate, up, activation, gate_term=gt, up_term=ut, dh_term=dt)
    assert (dh.data_ptr(), gate.data_ptr(), up.data_ptr()) == pointers
    torch.testing.assert_close(dh.float(), h.detach(), **TOL[dtype])
    torch.testing.assert_close(gate.float(), dg, **TOL[dtype])
    torch.testing.assert_close(up.float(), du, **TOL[dtype])


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_references_complete_the_tensors_first(activation):
    rows, cols, rank = 9, 21, 4
    gate, up, dh = torch.randn(rows, cols) * 3, torch.randn(rows, cols), torch.randn(rows, cols)
    gt, ut = terms(rows, cols, rank, "cpu", torch.float32), terms(rows, cols, rank, "cpu", torch.float32)
    dt = LowRank(torch.randn(rows, rank), torch.randn(rank, cols), 0.5)
    torch.testing.assert_close(glu_low_rank_reference(gate, up, activation, gt, ut),
                               glu_reference(full(gate, gt), full(up, ut), activation))
    g, u, d = full(gate, gt), full(up, ut), full(dh, dt)
    glu_backward_inplace_reference(d, g, u, activation)
    glu_backward_inplace_reference(dh, gate, up, activation, gate_term=gt, up_term=ut, dh_term=dt)
    for ours, expected in ((dh, d), (gate, g), (up, u)):
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_bad_terms_are_named():
    x = torch.randn(6, 10)
    good = LowRank(torch.randn(6, 4), torch.randn(4, 10), 1.0)
    with pytest.raises(ValueError, match=r"up_term is xa \(6, 4\) @ right \(4, 9\)"):
        kernels.glu_low_rank(x, x.clone(), "silu", good, LowRank(good.xa, torch.randn(4, 9), 1.0))
    with pytest.raises(ValueError, match=r"dh_term.xa is torch.float16"):
        kernels.glu_backward_inplace(x.clone(), x.clone(), x.clone(), "silu",
                                     dh_term=LowRank(good.xa.half(), good.right, 1.0))
    with pytest.raises(ValueError, match="2-D and contiguous"):
        kernels.glu_low_rank(x.t(), x.t(), "silu", LowRank(torch.randn(10, 4), torch.randn(4, 6), 1.0))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        kernels.glu_low_rank(x, x, "relu", good)


# Sizes where programs walk several column tiles and several programs share a row block (the
# partial sums of the products are then added by the second kernel).
PRODUCT_CASES = CASES + [(40, 700, 16)]


def down_a(rank, cols, device, dtype):
    """The down adapter's A [r, intermediate], as the fused MLP passes it."""
    return (torch.randn(rank, cols) / cols ** 0.5).to(device, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,rank", PRODUCT_CASES)
@pytest.mark.parametrize("present", [("gate", "up", "dh"), ("up",), ("gate", "dh")])
def test_backward_also_makes_the_gradients_of_the_term_inputs(device, dtype, rows, cols, rank, present):
    gate = (torch.randn(rows, cols) * 3).to(device, dtype)
    up = torch.randn(rows, cols).to(device, dtype)
    dh = torch.randn(rows, cols).to(device, dtype)
    gt = terms(rows, cols, rank, device, dtype, stacked_with=rank) if "gate" in present else None
    ut = terms(rows, cols, rank + 3, device, dtype) if "up" in present else None
    dt = LowRank(torch.randn(rows, rank).to(device, dtype), down_a(rank, cols, device, dtype), 1.0) \
        if "dh" in present else None
    width = sum(t.xa.shape[1] for t in (gt, ut) if t is not None)
    dxa = torch.full((rows, width), float("nan"), device=device, dtype=dtype)
    kernels.glu_backward_inplace(dh, gate, up, "silu", gate_term=gt, up_term=ut, dh_term=dt, xa_grads_out=dxa)
    # what the unfused backward computes from the written gradients: s dgate B_gate, s dup B_up
    expected = torch.cat([t.scale * (grad.float() @ t.right.float().t())
                          for grad, t in ((gate, gt), (up, ut)) if t is not None], dim=1)
    torch.testing.assert_close(dxa.float(), expected, **TOL[dtype])


def test_the_products_leave_the_glu_results_unchanged(device):
    rows, cols, rank = 40, 700, 16
    gate, up, dh = (torch.randn(rows, cols) * 2).to(device), torch.randn(rows, cols).to(device), \
        torch.randn(rows, cols).to(device)
    gt, ut = terms(rows, cols, rank, device, torch.float32), terms(rows, cols, rank, device, torch.float32)
    plain = [t.clone() for t in (dh, gate, up)]
    kernels.glu_backward_inplace(*plain, "silu", gate_term=gt, up_term=ut)
    with_products = [t.clone() for t in (dh, gate, up)]
    kernels.glu_backward_inplace(*with_products, "silu", gate_term=gt, up_term=ut,
                                 xa_grads_out=torch.empty(rows, 2 * rank, device=device))
    for a, b in zip(plain, with_products):
        if a.is_cuda:
            assert torch.equal(a, b)
        else:   # Triton 3.9's interpreter rounds the adapter terms' tl.dot by tile shape (~1e-6 apart)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_product_targets_are_named():
    x = torch.randn(6, 10)
    gt = LowRank(torch.randn(6, 4), torch.randn(4, 10), 1.0)
    with pytest.raises(ValueError, match=r"xa_grads_out must be \[rows, 4\]"):
        kernels.glu_backward_inplace(x.clone(), x.clone(), x.clone(), "silu", gate_term=gt,
                                     xa_grads_out=torch.empty(6, 5))
    with pytest.raises(ValueError, match="xa_grads_out needs a gate_term or an up_term"):
        kernels.glu_backward_inplace(x.clone(), x.clone(), x.clone(), "silu", xa_grads_out=torch.empty(6, 4))
    with pytest.raises(ValueError, match=r"xa_grads_out must be \[rows, 4\] with contiguous columns"):
        kernels.glu_backward_inplace(x.clone(), x.clone(), x.clone(), "silu", gate_term=gt,
                                     xa_grads_out=torch.empty(4, 6).t())
    with pytest.raises(ValueError, match=r"xa_grads_out is \(6, 4\) torch.float16"):
        kernels.glu_backward_inplace(x.clone(), x.clone(), x.clone(), "silu", gate_term=gt,
                                     xa_grads_out=torch.empty(6, 4, dtype=torch.float16))
