"""`--quant dynamic` GGUF: the Fisher diagonal against autograd's per-row gradients, the convex-hull
allocation within the byte budget, and a dynamic file that stays within Q4_K_M's size and reads
back through our GGUF loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

import velotune
from velotune.export import export
from velotune.export.dynamic import candidates, choose_types, fisher_diagonals, hull
from velotune.export.gguf import GGUFTensor, plan_gguf


def test_fisher_matches_per_row_gradients(bpe_tokenizer):
    model = tiny_model("llama", bpe_tokenizer.vocab_size)
    ids = torch.randint(3, bpe_tokenizer.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24)[None]
    fisher = fisher_diagonals(model, ids, positions, seed=7)
    assert len(fisher) == 2 * 7 and all(not p.requires_grad or p.grad is None for p in model.parameters())
    # the same sampled labels, through autograd on the weights themselves
    name = "model.layers.1.mlp.down_proj.weight"
    weight = model.get_parameter(name)
    weight.requires_grad_(True)
    logits = model(ids, position_ids=positions).logits[0].float()
    generator = torch.Generator().manual_seed(7)
    sampled = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=generator)[:, 0]
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, sampled, reduction="sum"), [weight])
    weight.requires_grad_(False)
    assert torch.allclose(fisher[name], grad.square(), rtol=1e-4, atol=1e-10)


def test_hull_keeps_only_efficient_options():
    points = [(100, 10.0, Q.Q4_K), (120, 9.5, Q.Q5_K), (140, 4.0, Q.Q6_K), (200, 4.0, Q.Q8_0)]
    kept = hull(points)
    # Q5_K saves 0.025/byte, then Q6_K 0.275/byte: Q6_K alone (0.15/byte) is the better upgrade;
    # Q8_0 saves nothing
    assert [p[2] for p in kept] == [Q.Q4_K, Q.Q6_K]


def fake_tensor(name: str, cols: int, value: float) -> GGUFTensor:
    w = np.random.default_rng(cols).normal(value, 1.0, (4, cols)).astype(np.float32)
    return GGUFTensor(name, (4, cols), Q.Q4_K, lambda: w, f"hf.{name}")


def test_choice_spends_the_budget_on_the_sensitive_weight():
    norm = GGUFTensor("norm", (4,), Q.F32, lambda: np.ones(4, np.float32))
    tensors = [fake_tensor("a", 256, 0.0), fake_tensor("b", 256, 0.0), norm]
    fisher = {"hf.a": torch.full((4, 256), 100.0), "hf.b": torch.full((4, 256), 1.0)}
    base = sum(t.nbytes for t in tensors)
    extra = 4 * (210 - 144)     # one tensor's step from Q4_K (144 B per block) to Q6_K (210 B)
    chosen = choose_types(tensors, fisher, base + extra, lambda _n, f: f)
    assert chosen["a"] == Q.Q6_K and chosen["b"] == Q.Q4_K
    assert choose_types(tensors, fisher, base, lambda _n, f: f) == {"a": Q.Q4_K, "b": Q.Q4_K}
    assert candidates(576) == (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0) and candidates(100) == ()


@pytest.mark.slow
def test_dynamic_file_within_q4_k_m_size(tmp_path, bpe_tokenizer):
    model = tiny_model("llama", bpe_tokenizer.vocab_size, hidden_size=256, intermediate_size=512)
    path = export(model, to="gguf", quant="dynamic", out=tmp_path / "d.gguf", tokenizer=bpe_tokenizer)
    q4km = sum(t.nbytes for t in plan_gguf(model, "q4_k_m"))
    reader = GGUFReader(path)
    written = sum(int(t.n_bytes) for t in reader.tensors)
    assert written <= q4km
    types = {t.tensor_type for t in reader.tensors if t.name.startswith("blk.") and "norm" not in t.name}
    assert types <= {Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0}
    loaded, _ = velotune.load_model(path, dtype=torch.float32, device="cpu")
    ids = torch.randint(3, bpe_tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99
