"""lora_init quant_error: the closed-form H-weighted low-rank fit, the adapter it sets, and the
layer-by-layer pass on a real (tiny) model loaded in 4-bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import velotune
from tests.cli.cli_helpers import make_chat_model
from velotune.models.calibration import calibration_ids
from velotune.lora.config import LoraConfig
from velotune.lora.layers import LoraLinear
from velotune.lora.model import apply_lora
from velotune.train.error_init import (
    A_ROW_NORM,
    compensate_quantization_error,
    layer_by_layer,
    low_rank_error_factors,
    set_adapter_to,
    top_singular_triplets,
)
from velotune.train import error_init

pytest.importorskip("transformers")


def correlated_inputs(tokens: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are correlated and of very different sizes, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g, dtype=torch.float64)
    sizes = torch.logspace(-1, 1, channels, dtype=torch.float64)
    return torch.randn(tokens, channels, generator=g, dtype=torch.float64) @ mix * sizes


def output_error(x: torch.Tensor, delta: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x @ delta.double().T).item()


def test_low_rank_fit_is_the_h_weighted_optimum():
    torch.manual_seed(0)
    error = torch.randn(24, 40, dtype=torch.float64)
    x = correlated_inputs(200, 40)
    hessian = x.T @ x
    b, a = low_rank_error_factors(error, hessian, rank=5, damp=0.0)
    assert b.shape == (24, 5) and a.shape == (5, 40)
    fit = (b.double() @ a.double())
    # Oracle by another route: whiten with the symmetric square root of H (not the Cholesky
    # factor), truncate the SVD, map back. The optimum is unique for distinct singular values.
    vals, vecs = torch.linalg.eigh(hessian)
    root, inv_root = vecs @ vals.sqrt().diag() @ vecs.T, vecs @ vals.rsqrt().diag() @ vecs.T
    u, s, vh = torch.linalg.svd(error @ root, full_matrices=False)
    oracle = (u[:, :5] * s[:5]) @ vh[:5] @ inv_root
    torch.testing.assert_close(fit, oracle, rtol=1e-4, atol=1e-4)
    before, after = output_error(x, error), output_error(x, error - fit)
    assert after == pytest.approx(s[5:].square().sum().sqrt().item(), rel=1e-4)   # Eckart-Young residual
    assert after < 0.8 * before
    # Better in the output norm than the plain (unweighted) rank-5 SVD of the error.
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    assert after < output_error(x, error - (u[:, :5] * s[:5]) @ vh[:5])


@pytest.mark.parametrize("shape", [(30, 70), (70, 30)])
def test_top_triplets_are_those_of_a_full_svd(shape):
    torch.manual_seed(0)
    matrix = torch.randn(*shape, dtype=torch.float64) * torch.linspace(0.1, 3, shape[1], dtype=torch.float64)
    u, s, vh = top_singular_triplets(matrix, 6)
    assert u.shape == (shape[0], 6) and s.shape == (6,) and vh.shape == (6, shape[1])
    full_u, full_s, full_vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(s, full_s[:6], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u * s @ vh, full_u[:, :6] * full_s[:6] @ full_vh[:6], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(vh @ vh.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)


def test_randomized_triplets_of_large_matrices_are_near_optimal_and_reproducible(monkeypatch):
    """Above EXACT_SVD_MAX_DIM the randomized path runs; a noise-like spectrum (white noise,
    mildly coloured), its hardest case, still leaves a residual within 1% of the optimum."""
    monkeypatch.setattr(error_init, "EXACT_SVD_MAX_DIM", 100)
    torch.manual_seed(0)
    matrix = torch.randn(300, 900, dtype=torch.float64) * torch.linspace(1, 4, 900, dtype=torch.float64)
    state = torch.get_rng_state()
    u, s, vh = top_singular_triplets(matrix, 16)
    assert torch.equal(torch.get_rng_state(), state)                  # the caller's random stream is untouched
    again = top_singular_triplets(matrix, 16)
    assert all(torch.equal(x, y) for x, y in zip((u, s, vh), again))   # same seed, same fit
    full_s = torch.linalg.svdvals(matrix)
    optimum = full_s[16:].square().sum()
    residual = (matrix - u * s @ vh).square().sum()
    assert optimum <= residual <= 1.01 * optimum


def test_low_rank_fit_checks_shapes_and_survives_dead_channels():
    error = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"expected \[in, in\]"):
        low_rank_error_factors(error, torch.eye(8), rank=2)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        low_rank_error_factors(error, torch.eye(16), rank=0)
    hessian = torch.eye(16)
    hessian[3, 3] = 0.0                       # a channel that never fires
    b, a = low_rank_error_factors(error, hessian, rank=20)
    assert b.shape == (8, 8) and torch.isfinite(b @ a).all()   # rank capped at min(out, in)
    torch.testing.assert_close(b @ a, error, rtol=1e-4, atol=1e-4)


def test_set_adapter_to_gives_the_fit_and_standard_a_rows():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(40, 24, bias=False), LoraConfig(r=8, alpha=16), torch.float32)
    b, a = torch.randn(24, 5), torch.randn(5, 40)
    default_rows = layer.lora_A.weight[5:].clone()
    set_adapter_to(layer, b, a)
    torch.testing.assert_close(layer.delta(torch.float32), b @ a, rtol=1e-5, atol=1e-5)
    rows = layer.lora_A.weight.norm(dim=1)
    torch.testing.assert_close(rows[:5], torch.full((5,), A_ROW_NORM))   # kaiming-uniform's row norm
    # The rank the fit does not use keeps A's default init (so it still trains) and a zero B.
    assert torch.equal(layer.lora_A.weight[5:], default_rows) and default_rows.abs().max() > 0
    assert layer.lora_B.weight[:, 5:].abs().max() == 0


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("error-init"))


def calibration_hessians(model, tokenizer) -> dict[str, torch.Tensor]:
    """H of every projection input, on the model as it is now (layer by layer, unchanged)."""
    ids, positions = calibration_ids(tokenizer)
    found: dict[str, torch.Tensor] = {}
    layer_by_layer(model, ids, positions,
                   lambda i, hs: found.update({f"model.layers.{i}.{p}": h.double() for p, h in hs.items()}))
    return found


def originals(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k[:-len(".weight")]: v.double() for k, v in load_file(folder / "model.safetensors").items()}


def weighted_gap(hessian: torch.Tensor, delta: torch.Tensor) -> float:
    """||X delta^T||_F = sqrt(tr(delta H delta^T))."""
    return (delta.double() @ hessian * delta.double()).sum().sqrt().item()


def test_compensation_brings_each_layer_closer_to_its_original(chat_folder):
    model, tokenizer = velotune.load_model(chat_folder, dtype=torch.float32, device="cpu", load_in_4bit=True)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=4, alpha=8), dtype=torch.float32)
    ids, positions = calibration_ids(tokenizer)
    plain_hessians = calibration_hessians(model, tokenizer)   # adapters still zero: H of the 4-bit model
    done = compensate_quantization_error(model, ids, positions)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert sorted(done) == sorted(layers) and len(done) == 14
    weights = originals(chat_folder)
    for name, layer in layers.items():
        base = layer.base_layer.dequantized_weight(torch.float32).double()
        adapted = base + layer.delta(torch.float32).double()
        h = plain_hessians[name]
        assert weighted_gap(h, weights[name] - adapted) < 0.95 * weighted_gap(h, weights[name] - base), name
    # The first layer's inputs do not depend on any adapter: there the fit is the closed form.
    name = "model.layers.0.self_attn.q_proj"
    layer = layers[name]
    error = weights[name].float() - layer.base_layer.dequantized_weight(torch.float32)
    b, a = low_rank_error_factors(error, plain_hessians[name].float(), rank=4)
    torch.testing.assert_close(layer.delta(torch.float32), b @ a, rtol=1e-3, atol=1e-5)


def test_compensation_refuses_a_model_without_4bit_adapters(chat_folder):
    model, tokenizer = velotune.load_model(chat_folder, dtype=torch.float32, device="cpu", load_in_4bit=True)
    ids, positions = calibration_ids(tokenizer)
    with pytest.raises(ValueError, match="no LoRA adapter sits on a 4-bit layer"):
        compensate_quantization_error(model, ids, positions)
    plain, _ = velotune.load_model(chat_folder, dtype=torch.float32, device="cpu")
    apply_lora(plain, LoraConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match="no LoRA adapter sits on a 4-bit layer"):
        compensate_quantization_error(plain, ids, positions)


def test_set_adapter_to_renews_the_dora_magnitude():
    """DoRA's magnitude starts as the norm of the adapted weight, so the layer computes W + b a."""
    torch.manual_seed(0)
    base = nn.Linear(40, 24, bias=False)
    layer = LoraLinear(base, LoraConfig(r=8, alpha=16, use_dora=True), torch.float32)
    b, a = torch.randn(24, 5) * 0.1, torch.randn(5, 40) * 0.1
    set_adapter_to(layer, b, a)
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (base.weight + b @ a).T, rtol=1e-5, atol=1e-5)
