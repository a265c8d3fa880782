"""The grouped-expert Triton path (kernels/ops/moe.py) against the PyTorch reference, forward and
backward (input, routing weights, expert weights and biases, per-expert LoRA A and B), under the
interpreter on the CPU in float32 and float16, and in bfloat16 on a GPU: awkward expert counts,
experts that receive no token, top-k 1 and 8, every activation."""
from __future__ import annotations

import pytest
import torch

from velotune.kernels import moe_experts
from velotune.kernels.moe_reference import ExpertAdapters, Experts, moe_experts_reference

TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def make_case(tokens, hidden, inter, num_experts, k, dtype, device, *, bias=False, lora=False,
              activation="silu", unused=(), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    x = rand(tokens, hidden)
    logits = torch.randn(tokens, num_experts, generator=g)
    logits[:, list(unused)] = -1e4                       # these experts get no token
    top, ids = torch.topk(logits, k, dim=-1)
    weights = torch.softmax(top, -1).to(device=device, dtype=dtype).requires_grad_()
    adapters = None
    if lora:
        adapters = (ExpertAdapters(rand(num_experts, 4, hidden, scale=0.3), rand(num_experts, 2 * inter, 4, scale=0.3), 0.5),
                    ExpertAdapters(rand(num_experts, 4, inter, scale=0.3), rand(num_experts, hidden, 4, scale=0.3), 2.0))
    experts = Experts(rand(num_experts, 2 * inter, hidden, scale=hidden ** -0.5),
                      rand(num_experts, hidden, inter, scale=inter ** -0.5),
                      rand(num_experts, 2 * inter, scale=0.5) if bias else None,
                      rand(num_experts, hidden, scale=0.5) if bias else None,
                      *(adapters or (None, None)), activation=activation)
    return x, ids.to(device), weights, experts


def leaves(x, weights, experts):
    out = [x, weights, experts.gate_up, experts.down, experts.gate_up_bias, experts.down_bias]
    for lora in (experts.gate_up_lora, experts.down_lora):
        out += [lora.a, lora.b] if lora else []
    return [t for t in out if t is not None]


def run(fn, case, dy):
    x, ids, weights, experts = case
    ts = leaves(x, weights, experts)
    y = fn(x, ids, weights, experts)
    grads = torch.autograd.grad(y, ts, dy)
    return y, grads


def check(case, device, dtype):
    dy = torch.randn(case[0].shape, generator=torch.Generator().manual_seed(9)).to(device=device, dtype=dtype)
    want, want_grads = run(moe_experts_reference, case, dy)
    got, got_grads = run(moe_experts, case, dy)
    tol = TOL[dtype]

    def rel(a, b):
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).norm() / b.norm().clamp(min=1e-6))

    assert rel(got, want) <= tol
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert rel(a, b) <= tol, f"gradient {i}: {rel(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_experts,k,unused", [(7, 1, ()), (5, 2, (1, 3)), (11, 8, (0,)), (3, 3, ())])
def test_grouped_experts_match_reference(device, dtype, num_experts, k, unused):
    check(make_case(37, 32, 24, num_experts, k, dtype, device, unused=unused), device, dtype)


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "swiglu_clamped"])
def test_biases_lora_and_activations(device, activation):
    case = make_case(29, 32, 24, 6, 2, torch.float32, device, bias=True, lora=True, activation=activation,
                     unused=(4,))
    with torch.no_grad():   # push some gate/up values past gpt-oss's clamp at 7
        case[3].gate_up.mul_(6.0)
    check(case, device, torch.float32)


def test_no_token_reaches_an_expert_edge(device):
    """One token, top-1: every expert but one is empty; the tile table has idle tiles."""
    check(make_case(1, 32, 16, 9, 1, torch.float32, device, lora=True), device, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 8])
def test_bfloat16_on_the_gpu(k):
    case = make_case(300, 256, 192, 16, k, torch.bfloat16, torch.device("cuda"), bias=True, lora=True, unused=(3,))
    check(case, torch.device("cuda"), torch.bfloat16)
