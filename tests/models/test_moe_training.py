"""Training settings of mixture-of-experts models: the load-balancing loss against transformers'
(one row, where the per-row form equals the batch form), the `router_aux_loss_coef` key, LoRA on
the router, and `disable_adapters` switching per-expert adapters off (DPO's reference model)."""
from __future__ import annotations

import pytest
import torch

import velotune
from velotune.lora import LoraConfig, apply_lora, disable_adapters
from velotune.train.config import TrainConfig, TrainConfigError
from velotune.train.methods import prepare

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
MOE = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24,
                                         intermediate_size=48, norm_topk_prob=True)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=24,
                                     sliding_window=4)),
}


def pair(family: str, tmp_path, **extra):
    cls, kw = MOE[family]
    cfg = getattr(transformers, cls)(**{**COMMON, **kw, **extra})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "experts" in name or "router" in name or name.endswith("mlp.gate.weight") or "sinks" in name:
                p.normal_(0.0, 0.2)
    ref.save_pretrained(tmp_path)
    ours, _ = velotune.load_model(tmp_path, dtype=torch.float32, device="cpu")
    return ref, ours


@pytest.mark.parametrize("family", sorted(MOE))
def test_load_balancing_loss_of_one_row_equals_transformers(family, tmp_path):
    ref, ours = pair(family, tmp_path, output_router_logits=True, router_aux_loss_coef=0.3)
    assert ours.config.router_aux_loss_coef == 0.3
    ids = torch.randint(3, 97, (1, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    ref.train(), ours.train()
    r = ref(input_ids=ids, labels=labels)
    o = ours(ids, labels=labels)
    assert o.aux_loss_sum is not None
    assert torch.allclose(o.aux_loss_sum / o.num_targets, r.aux_loss, rtol=1e-5)
    assert torch.allclose(o.loss, r.loss, rtol=1e-5)


def test_router_aux_loss_coef_key(tmp_path):
    _, ours = pair("qwen3_moe", tmp_path)
    assert ours.config.router_aux_loss_coef == 0.0       # the checkpoint does not output router logits
    prepare(ours, TrainConfig(router_aux_loss_coef=0.02))
    assert ours.config.router_aux_loss_coef == 0.02
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    ours.train()
    out = ours(ids, labels=ids)
    assert out.aux_loss_sum is not None and out.aux_loss_sum > 0
    ours.config.router_aux_loss_coef = 0.0
    plain = ours(ids, labels=ids)
    assert torch.allclose(out.loss_sum, plain.loss_sum + 0.02 * out.aux_loss_sum)

    dense = velotune.models.transformer.Transformer(velotune.ModelConfig(
        model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    with pytest.raises(TrainConfigError, match="'router_aux_loss_coef'.*llama model has no experts"):
        prepare(dense, TrainConfig(router_aux_loss_coef=0.01))
    prepare(dense, TrainConfig())            # null: nothing to set


@pytest.mark.parametrize("family", sorted(MOE))
def test_disable_adapters_switches_expert_and_router_adapters_off(family, tmp_path):
    _, ours = pair(family, tmp_path)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = ours(ids).logits
    torch.manual_seed(4)
    apply_lora(ours, LoraConfig(r=2, target_modules=["q_proj", "experts", "router"], init=False))
    assert any(n.endswith("router.lora_A.weight") for n, p in ours.named_parameters() if p.requires_grad)
    with torch.no_grad():
        adapted = ours(ids).logits
        with disable_adapters(ours):
            off = ours(ids).logits
        again = ours(ids).logits
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(off, base) and torch.equal(again, adapted)
