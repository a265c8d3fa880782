"""Merging adapters into the base and back: exact round trip, same logits merged and unmerged,
`disable_adapters` gives the base model, and a tied head never changes the embedding."""
from __future__ import annotations

import pytest
import torch
from tests.lora.lora_helpers import assert_logits_close, batch, load_ours, make_reference, scatter_magnitudes

from velotune.lora import (
    LoraConfig,
    LoraStateError,
    apply_lora,
    disable_adapters,
    is_merged,
    merge_lora,
    merged_linear,
    unmerge_lora,
)

TARGETS = {
    "lora": dict(target_modules="all-linear"),
    "dora": dict(target_modules="all-linear", use_dora=True),
    "dora-embed-head": dict(target_modules=["q_proj", "o_proj", "up_proj", "embed_tokens", "lm_head"], use_dora=True),
    "rslora-embed-head": dict(target_modules=["v_proj", "embed_tokens", "lm_head"], use_rslora=True),
}


def adapted(tmp_path, family: str, case: str):
    make_reference(family, tmp_path)
    model = load_ours(tmp_path)
    ids, _ = batch()
    with torch.no_grad():
        base_logits = model(ids).logits
    torch.manual_seed(3)
    apply_lora(model, LoraConfig(r=4, alpha=8, init=False, **TARGETS[case]))
    scatter_magnitudes(model.named_parameters())
    return model, ids, base_logits


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize(("family", "case"), [("llama", "lora"), ("llama", "dora-embed-head"),
                                             ("qwen2", "dora"), ("qwen2", "rslora-embed-head")])
def test_merge_unmerge_round_trip(family, case, tmp_path):
    model, ids, base_logits = adapted(tmp_path, family, case)
    before = base_weights(model)
    with torch.no_grad():
        logits = model(ids).logits
        merge_lora(model)
        assert is_merged(model)
        merged_logits = model(ids).logits
        merged = base_weights(model)
        assert any(not torch.equal(merged[n], before[n]) for n in before), "merging changed no base weight"
        unmerge_lora(model)
        unmerged_logits = model(ids).logits
    assert_logits_close(merged_logits, logits)
    assert_logits_close(unmerged_logits, logits)
    after = base_weights(model)
    assert after.keys() == before.keys()
    for name, value in before.items():  # rounding is relative to the larger of base and merged
        scale = max(value.abs().max(), merged[name].abs().max())
        assert torch.allclose(after[name], value, rtol=0, atol=1e-6 * float(scale)), name
    assert (logits - base_logits).abs().max() > 0.05 * base_logits.abs().max()


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapters_gives_the_base_model(merged, tmp_path):
    model, ids, base_logits = adapted(tmp_path, "llama", "dora-embed-head")
    with torch.no_grad():
        logits = model(ids).logits
        if merged:
            merge_lora(model)
        with disable_adapters(model):
            off = model(ids).logits
        again = model(ids).logits
    assert_logits_close(off, base_logits, tol=1e-6)
    assert_logits_close(again, logits)
    assert is_merged(model) == merged


def test_tied_head_merge_leaves_the_embedding_alone(tmp_path):
    model, ids, _ = adapted(tmp_path, "llama", "rslora-embed-head")
    assert model.config.tie_word_embeddings
    shared = model.model.embed_tokens.base_layer.weight
    assert model.lm_head.base_layer.weight is shared
    embedding = shared.detach().clone()
    merge_lora(model)
    assert model.lm_head.base_layer.weight is not shared
    assert model.model.embed_tokens.base_layer.weight is not shared
    assert torch.equal(shared, embedding)
    assert not model.config.tie_word_embeddings  # an export must write the merged head
    unmerge_lora(model)
    assert model.lm_head.base_layer.weight is shared and model.model.embed_tokens.base_layer.weight is shared
    assert model.config.tie_word_embeddings


def test_training_the_head_adapter_does_not_touch_the_embedding(tmp_path):
    model, ids, _ = adapted(tmp_path, "llama", "rslora-embed-head")
    shared = model.lm_head.base_layer.weight
    before = shared.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert shared.grad is None and torch.equal(shared, before)


def test_merged_linear_matches_merge_without_changing_the_layer(tmp_path):
    model, _, _ = adapted(tmp_path, "qwen2", "dora")
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    weight, bias = merged_linear(layer)
    assert torch.equal(layer.base_layer.weight, before)
    merge_lora(model)
    assert torch.allclose(weight, layer.base_layer.weight, rtol=0, atol=1e-6)
    assert torch.equal(bias, layer.base_layer.bias)
    assert merged_linear(model.model.norm) is None


def test_merge_twice_and_unmerge_unmerged_are_errors(tmp_path):
    model, _, _ = adapted(tmp_path, "qwen2", "lora")
    with pytest.raises(LoraStateError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(LoraStateError, match="already merged"):
        merge_lora(model)
