"""Adapters cross between velotune and PEFT both ways with the same logits (1e-5 of max |logit|),
on a tied-head Llama and an untied Qwen2, for LoRA, rsLoRA, DoRA and embedding/head targets."""
from __future__ import annotations

import json

import pytest
import torch
from tests.lora.lora_helpers import assert_logits_close, batch, load_ours, make_reference, scatter_magnitudes

import velotune
from velotune.lora import LoraConfig, apply_lora, save_adapter

peft = pytest.importorskip("peft")

VARIANTS = {
    "lora": dict(target_modules="all-linear"),
    "rslora": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], use_rslora=True),
    "dora": dict(target_modules="all-linear", use_dora=True),
    "dora-embed-head": dict(target_modules=["q_proj", "up_proj", "embed_tokens", "lm_head"], use_dora=True),
    "lora-embed-head": dict(target_modules=["v_proj", "embed_tokens", "lm_head"]),
}


def peft_config(variant: str):
    kw = dict(VARIANTS[variant])
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                           target_modules=kw.pop("target_modules"), **kw)


# Every variant on the tied-head Llama; the untied Qwen2 (q/k/v biases) with two of them.
OUR_CASES = [("llama", v) for v in sorted(VARIANTS)] + [("qwen2", "dora-embed-head"), ("qwen2", "rslora")]
PEFT_CASES = [("llama", "lora"), ("llama", "dora-embed-head"), ("qwen2", "dora"), ("qwen2", "rslora")]


@pytest.mark.parametrize(("family", "variant"), OUR_CASES)
def test_our_adapter_loads_in_peft(family, variant, tmp_path):
    ref = make_reference(family, tmp_path / "base")
    ours = load_ours(tmp_path / "base")
    ids, _ = batch()
    with torch.no_grad():
        base_logits = ours(ids).logits
    torch.manual_seed(3)
    apply_lora(ours, LoraConfig(r=4, alpha=8, init=False, **VARIANTS[variant]))  # B random, not zero
    scatter_magnitudes(ours.named_parameters())
    with torch.no_grad():
        logits = ours(ids).logits
    assert (logits - base_logits).abs().max() > 0.05 * base_logits.abs().max()  # the adapter matters

    save_adapter(ours, tmp_path / "adapter", tmp_path / "base")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4 and written["lora_alpha"] == 8
    assert written["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    loaded = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits
    assert_logits_close(logits, expected)


@pytest.mark.parametrize(("family", "variant"), PEFT_CASES)
def test_peft_adapter_loads_here(family, variant, tmp_path):
    ref = make_reference(family, tmp_path / "base")
    torch.manual_seed(4)
    made = peft.get_peft_model(ref, peft_config(variant)).eval()
    scatter_magnitudes(made.named_parameters())
    made.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "../base"  # relative to the adapter folder
    config_path.write_text(json.dumps(config))
    ids, _ = batch()
    with torch.no_grad():
        expected = made(input_ids=ids).logits
        with made.disable_adapter():
            base_logits = made(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 0.05 * base_logits.abs().max()

    ours, tokenizer = velotune.load_model(tmp_path / "adapter", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        got = ours.eval()(ids).logits
    assert_logits_close(got, expected)
    assert ours.lora_config.use_dora == ("dora" in variant)
    assert ours.lora_config.use_rslora == (variant == "rslora")
