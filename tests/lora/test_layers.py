"""The layers on their own: the 4-bit base, PEFT's initialisation, dropout, the effective weight."""
from __future__ import annotations

import pytest
import torch
from tests.lora.lora_helpers import load_ours, make_reference, our_name
from torch import nn

from velotune.lora import LoraConfig, LoraLinear, apply_lora, lora_state_dict, merge_lora, unmerge_lora
from velotune.quant import Linear4bit


def linear4bit(seed: int = 0) -> Linear4bit:
    torch.manual_seed(seed)
    return Linear4bit.from_linear(nn.Linear(64, 48, bias=True))


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_a_4bit_base(dora):
    base = linear4bit()
    torch.manual_seed(1)
    layer = LoraLinear(base, LoraConfig(r=4, alpha=8, init=False, use_dora=dora))
    with torch.no_grad():
        layer.lora_magnitude_vector is None or layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 48))
    x = torch.randn(5, 64)
    weight = base.dequantized_weight(torch.float32)
    adapted = weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    if dora:
        adapted = (layer.lora_magnitude_vector / adapted.norm(dim=1))[:, None] * adapted
    expected = x @ adapted.t() + base.bias
    got = layer(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert torch.allclose(layer.weight, adapted, rtol=0, atol=1e-6 * adapted.abs().max().item())

    packed = base.packed.clone()
    layer.merge()
    assert isinstance(layer.base_layer, nn.Linear) and not isinstance(layer.base_layer, Linear4bit)
    assert torch.allclose(layer(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    layer.unmerge()
    assert layer.base_layer is base and torch.equal(base.packed, packed)
    got.sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None


def test_default_init_is_peft_s_for_the_same_seed(tmp_path):
    peft = pytest.importorskip("peft")
    ref = make_reference("llama", tmp_path)
    ours = load_ours(tmp_path)
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]
    torch.manual_seed(11)
    theirs = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(11)
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=targets))
    mine = lora_state_dict(ours)
    reference = {our_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(reference)
    for name, value in reference.items():
        assert torch.equal(mine[name], value), name
    a = mine["model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.abs().max() > 0 and a.abs().max() <= 1 / 32 ** 0.5  # kaiming-uniform(a=sqrt(5)): 1/sqrt(fan_in)
    assert not mine["model.layers.0.self_attn.q_proj.lora_B.weight"].any()
    assert not mine["model.embed_tokens.lora_embedding_A"].any()


def test_identity_at_init_and_gaussian_init():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    for init in (True, "gaussian"):
        layer = LoraLinear(base, LoraConfig(r=4, alpha=4, init=init))
        assert torch.equal(layer(x), base(x))
    assert abs(layer.lora_A.weight.std().item() - 0.25) < 0.1  # gaussian: std 1/r


def test_dropout_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(32, 32)
    layer = LoraLinear(base, LoraConfig(r=4, alpha=4, dropout=0.5, init=False))
    x = torch.randn(4, 32)
    layer.eval()
    first, second = layer(x), layer(x)
    assert torch.equal(first, second)
    layer.train()
    torch.manual_seed(1)
    trained = layer(x)
    assert not torch.allclose(trained, first)
    torch.manual_seed(1)
    mask = nn.functional.dropout(torch.ones_like(x), 0.5)
    expected = base(x) + layer.lora_B(layer.lora_A(x * mask))
    assert torch.allclose(trained, expected, atol=1e-6)


def test_tie_weights_after_lora_sets_the_base(tmp_path):
    make_reference("llama", tmp_path)
    model = load_ours(tmp_path)
    apply_lora(model, LoraConfig(r=2, target_modules=["lm_head"]))
    model.tie_weights()
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    assert "weight" not in dict(model.lm_head.named_parameters(recurse=False))
    with pytest.raises(TypeError, match="nn.Parameter"):
        model.lm_head.weight = torch.zeros(3)


def test_merge_then_unmerge_bias_free_layer_restores_weights():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 8, bias=False))
    before = model.q_proj.weight.detach().clone()
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"], init=False, use_dora=True))
    merge_lora(model)
    assert not torch.allclose(model.q_proj.base_layer.weight, before)
    unmerge_lora(model)
    assert torch.allclose(model.q_proj.base_layer.weight, before, atol=1e-6)
