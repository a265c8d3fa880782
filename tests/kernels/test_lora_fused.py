"""The fused LoRA blocks on the Triton path (GLU forward and in-place GLU backward as kernels; the
interpreter on CPU, compiled on a GPU) against the unfused path with kernels off; on the GPU also
bf16 autocast over a bf16 base with float32 adapters, and the activation memory of 8B-sized
blocks (kept for the backward, and the peak). Training steps with the fused path against the
unfused one are tests/kernels/test_convergence.py (kernels on vs off)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from velotune import kernels
from velotune.lora import LoraConfig, fused
from velotune.lora.layers import LoraLinear


def norm_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def mlp_modules(hidden: int, inter: int, r: int, device, base_dtype=torch.float32) -> list[LoraLinear]:
    torch.manual_seed(0)
    shapes = ((hidden, inter), (hidden, inter), (inter, hidden))
    layers = []
    for n_in, n_out in shapes:
        base = nn.Linear(n_in, n_out, bias=False, device=device).requires_grad_(False)
        layers.append(LoraLinear(base.to(base_dtype), LoraConfig(r=r, alpha=2 * r, init=False), dtype=torch.float32))
    return layers


def run(fn, x, modules, upstream):
    for m in modules:
        m.lora_A.weight.grad = m.lora_B.weight.grad = None
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(upstream)
    return [out.detach(), x.grad] + [p.grad for m in modules for p in (m.lora_A.weight, m.lora_B.weight)]


def compare_mlp(modules, x, activation, autocast_dtype=None):
    device = x.device.type
    upstream = torch.randn(*x.shape[:-1], modules[2].out_features, device=x.device)
    autocast = torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    with autocast:
        got = run(lambda t: fused.mlp(t, *modules, activation), x, modules, upstream.to(autocast_dtype or x.dtype))
    kernels.set_kernels_enabled(False)
    try:
        with autocast:
            ref = run(lambda t: modules[2](kernels.glu(modules[0](t), modules[1](t), activation)), x, modules,
                      upstream.to(autocast_dtype or x.dtype))
    finally:
        kernels.set_kernels_enabled(True)
    return [norm_err(g, r) for g, r in zip(got, ref, strict=True)]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_fused_mlp_on_kernels_float32(device, activation):
    modules = mlp_modules(37, 83, 3, device)
    x = torch.randn(3, 13, 37, device=device)
    assert kernels.use_triton(x)  # the GLU and its in-place backward run as Triton kernels
    errors = compare_mlp(modules, x, activation)
    assert max(errors) <= 1e-5, errors


# ---- GPU: bf16 --------------------------------------------------------------------------------

# bf16 autocast over a bf16 base, float32 adapters: both paths round each matmul to bf16 (relative
# rounding 2^-9) at different points; measured in relative norm.
BF16_NORM_TOL = 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_fused_mlp_bf16_autocast_gpu(activation):
    modules = mlp_modules(1000, 2750, 16, "cuda", torch.bfloat16)
    x = torch.randn(2, 1027, 1000, device="cuda")
    errors = compare_mlp(modules, x, activation, torch.bfloat16)
    assert max(errors) <= BF16_NORM_TOL, errors


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["no-autocast", "bf16-autocast"])
def test_fused_blocks_memory_8b_shapes_gpu(autocast):
    """Llama-3.1-8B's q/k/v, o and MLP blocks (bf16 base, float32 adapters r16, 4096 tokens; no
    autocast as benchmarks/bench_train.py runs, autocast as the trainer does): the activations kept
    for the backward and the forward + backward peak, fused vs the modules' own forwards (Triton GLU
    on both sides). Printed for the report; asserted to shrink."""
    torch.manual_seed(0)

    def lora(n_in: int, n_out: int) -> LoraLinear:
        base = nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        return LoraLinear(base, LoraConfig(r=16, alpha=16, init=False), dtype=torch.float32)

    q, k, v, o = lora(4096, 4096), lora(4096, 1024), lora(4096, 1024), lora(4096, 4096)
    gate, up, down = lora(4096, 14336), lora(4096, 14336), lora(14336, 4096)
    cases = {
        "q/k/v": (lambda t: fused.project(t, q, k, v), lambda t: (q(t), k(t), v(t))),
        "o": (lambda t: fused.project(t, o), lambda t: (o(t),)),
        "mlp": (lambda t: (fused.mlp(t, gate, up, down, "silu"),),
                lambda t: (down(kernels.glu(gate(t), up(t), "silu")),)),
    }
    x = torch.randn(2, 2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    context = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)

    def measure(call) -> tuple[int, int]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with context:
            outs = call(x)
        kept = torch.cuda.memory_allocated() - before - sum(t.numel() * t.element_size() for t in outs)
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        del outs
        peak = torch.cuda.max_memory_allocated() - before
        x.grad = None
        for m in (q, k, v, o, gate, up, down):
            m.zero_grad(set_to_none=True)
        return kept, peak

    total, ref_total = 0, 0
    for name, (fused_call, plain_call) in cases.items():
        (kept, peak), (ref_kept, ref_peak) = measure(fused_call), measure(plain_call)
        print(f"\n{name}: kept for backward fused {kept / 2**20:.0f} MiB vs unfused {ref_kept / 2**20:.0f} MiB; "
              f"forward + backward peak {peak / 2**20:.0f} vs {ref_peak / 2**20:.0f} MiB")
        assert peak < ref_peak, name
        total, ref_total = total + kept, ref_total + ref_kept
    assert total <= 0.6 * ref_total, f"fused {total / 2**20:.0f} MiB vs unfused {ref_total / 2**20:.0f} MiB"
