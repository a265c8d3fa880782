"""Convergence on the GPU: 50 LoRA steps of a small Llama-architecture model with the kernels and
without them give losses within 1% at every step and adapters within 2% relative norm.

Measured on an H100 (2026-11-23), relative norm of the adapter difference after 50 steps:
- float32 model: fast vs reference 0.0000 (to 4 decimals), so the 2% bound is asserted there;
- bf16 model: fast vs reference 3.4%, but the reference path itself ends 5.1% from the float32
  run and the fast path 5.2% (fp16: 3.5-3.8% fast vs reference). Half-precision rounding, which
  Adam turns into full-size steps on near-zero gradients, sets that floor: any two bf16
  implementations land this far apart. In bf16 the test therefore asserts the losses (1%) and
  that the fast path is no farther from the reference than the reference is from exact
  arithmetic, and no farther from exact arithmetic than the reference (10% slack).
"""
from __future__ import annotations

import pytest
import torch

from velotune import kernels
from velotune.lora import LoraConfig, apply_lora, lora_named_parameters
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer

STEPS = 50


def run(fast: bool, dtype: torch.dtype) -> tuple[list[float], dict[str, torch.Tensor]]:
    kernels.set_kernels_enabled(fast)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(model_type="llama", vocab_size=1001, hidden_size=256, intermediate_size=688,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
        with torch.device("cuda"):
            model = Transformer(cfg).to(dtype)
        model.gradient_checkpointing = True
        apply_lora(model, LoraConfig(r=8, alpha=16), dtype=torch.float32)
        model.train()
        params = [p for _, p in lora_named_parameters(model)]
        opt = torch.optim.AdamW(params, lr=2e-3)
        g = torch.Generator(device="cuda").manual_seed(1)
        # a learnable signal: every sequence repeats a short random pattern
        pattern = torch.randint(0, 1001, (8, 17), device="cuda", generator=g)
        ids = pattern.repeat(1, 8)[:, :129]
        losses = []
        for _ in range(STEPS):
            out = model(ids, labels=ids, return_logits=False)
            loss = out.loss_sum / out.num_targets
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, {n: p.detach().float().clone() for n, p in lora_named_parameters(model)}
    finally:
        kernels.set_kernels_enabled(True)


def adapter_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over the whole adapter (all matrices concatenated)."""
    diff = torch.cat([(a[n] - w).flatten() for n, w in b.items()]).norm()
    return (diff / torch.cat([w.flatten() for w in b.values()]).norm()).item()


def assert_losses_close(fast: list[float], ref: list[float]) -> None:
    assert fast[-1] < 0.5 * fast[0], "the model did not learn"
    for step, (a, b) in enumerate(zip(fast, ref)):
        assert abs(a - b) <= 0.01 * abs(b), f"step {step}: {a} vs {b}"


@pytest.mark.gpu
def test_fast_path_converges_like_the_reference_float32():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fast_losses, fast_w = run(True, torch.float32)
    ref_losses, ref_w = run(False, torch.float32)
    assert_losses_close(fast_losses, ref_losses)
    distance = adapter_distance(fast_w, ref_w)
    assert distance <= 0.02, f"adapter relative difference {distance:.4f}"


@pytest.mark.gpu
def test_fast_path_bf16_stays_within_the_reference_rounding_floor():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fast_losses, fast_w = run(True, torch.bfloat16)
    ref_losses, ref_w = run(False, torch.bfloat16)
    _, exact_w = run(False, torch.float32)
    assert_losses_close(fast_losses, ref_losses)
    fast_ref, ref_exact = adapter_distance(fast_w, ref_w), adapter_distance(ref_w, exact_w)
    fast_exact = adapter_distance(fast_w, exact_w)
    assert fast_ref <= ref_exact, f"fast vs reference {fast_ref:.4f} > reference vs float32 {ref_exact:.4f}"
    assert fast_exact <= 1.1 * ref_exact, f"fast vs float32 {fast_exact:.4f}, reference vs float32 {ref_exact:.4f}"
