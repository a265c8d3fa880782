"""Linear4bit: forward and backward equal a matmul with the dequantized weight; nothing trains."""
import pytest
import torch
from torch import nn

from velotune.quant import Linear4bit, dequantize_nf4, state_to_tensors


@pytest.fixture
def pair():
    torch.manual_seed(0)
    linear = nn.Linear(192, 80, bias=True).to(torch.bfloat16)
    return linear, Linear4bit.from_linear(linear, quant_type="nf4")


def test_forward_is_dequantized_matmul_plus_bias(pair):
    linear, q = pair
    assert (q.in_features, q.out_features) == (192, 80)
    x = torch.randn(2, 5, 192, dtype=torch.bfloat16)
    w = q.dequantized_weight()
    assert w.dtype == torch.bfloat16 and w.shape == (80, 192)
    assert torch.equal(q(x), x @ w.t() + linear.bias)
    # Close to the unquantized layer: NF4 error is a few percent of the weight scale.
    rel = (q(x) - linear(x)).float().norm() / linear(x).float().norm()
    assert 0.01 < rel < 0.15


def test_compute_dtype_follows_input(pair):
    _, q = pair
    x = torch.randn(3, 192)
    assert torch.equal(q(x), x @ q.dequantized_weight(torch.float32).t() + q.bias.float())


def test_backward_gives_input_gradient_only(pair):
    _, q = pair
    assert [p.requires_grad for p in q.parameters()] == [False]  # only the (frozen) bias
    x = torch.randn(4, 192, requires_grad=True)
    q(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (x2 @ q.dequantized_weight(torch.float32).t() + q.bias.float()).pow(2).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_casting_the_model_keeps_the_tables_exact(pair):
    _, q = pair
    before = q.dequantized_weight()
    q.to(torch.float16)  # casts the bias; the int/uint8 buffers stay as they are
    assert q.bias.dtype == torch.float16
    assert torch.equal(q.dequantized_weight(), before)


def test_state_round_trip(pair):
    _, q = pair
    tensors = state_to_tensors("w", q.packed, q.quant_state)
    assert torch.equal(dequantize_nf4(tensors["w"], q.quant_state), q.dequantized_weight())


def test_rejects_non_matrix():
    from velotune.quant import quantize_nf4

    packed, state = quantize_nf4(torch.randn(64))
    with pytest.raises(ValueError, match="2-D weight"):
        Linear4bit(packed, state)
