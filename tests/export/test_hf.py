"""Merged Hugging Face export: transformers (the oracle) loads the folder and computes our logits
within 1e-5 in float32, for LoRA, DoRA and QLoRA (4-bit base dequantized, then merged) models;
shards, index, tied heads, Phi-3 fusing and the tokenizer files."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_transformers_matches, merged_export, sample_ids, tiny_model
from conftest import hf_source as conftest_hf_source
from safetensors import safe_open

import velotune
from velotune.export import export
from velotune.lora import LoraConfig, apply_lora
from velotune.quant.model import quantize_linears
from velotune.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 160


def hf_source(config_class: str, tmp_path, **extra):
    return conftest_hf_source(config_class, tmp_path / "base", intermediate_size=96, **extra)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_merged_matches_transformers(tmp_path, dora):
    model = hf_source("LlamaConfig", tmp_path, tie_word_embeddings=True)
    with torch.no_grad():
        base_logits = model(sample_ids(VOCAB)).logits
    torch.manual_seed(3)
    apply_lora(model, LoraConfig(r=4, alpha=8, init=False, use_dora=dora, target_modules="all-linear"))
    model.eval()
    with torch.no_grad():
        adapted = model(sample_ids(VOCAB)).logits
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    out = tmp_path / "merged"
    names = merged_export(model, out)
    assert "lm_head.weight" not in names and not any("lora" in n for n in names)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_qlora_dequantizes_then_merges(tmp_path):
    model = hf_source("Qwen2Config", tmp_path, tie_word_embeddings=False)
    assert len(quantize_linears(model)) == 14
    torch.manual_seed(4)
    apply_lora(model, LoraConfig(r=4, alpha=8, init=False))
    model.eval()
    out = export(model, to="hf", quant="f32", out=tmp_path / "merged")
    assert_transformers_matches(model, out)


def test_adapter_on_tied_head_is_written_untied(tmp_path):
    model = hf_source("LlamaConfig", tmp_path, tie_word_embeddings=True)
    torch.manual_seed(5)
    apply_lora(model, LoraConfig(r=2, init=False, target_modules=["q_proj", "lm_head"]))
    out = export(model.eval(), to="hf", out=tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert_transformers_matches(model, out)


def test_phi3_fused_and_sharded_with_index(tmp_path, tokenizer):
    model = hf_source("Phi3Config", tmp_path, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(6)
    apply_lora(model, LoraConfig(r=2, init=False))
    out = export(model.eval(), to="hf", out=tmp_path / "merged", tokenizer=tokenizer, max_shard_size=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    assert "model.layers.0.self_attn.qkv_proj.weight" in index["weight_map"]
    assert "model.layers.0.mlp.gate_up_proj.weight" in index["weight_map"]
    assert index["metadata"]["total_size"] == sum(4 * p.numel() for p in
                                                  velotune.load_model(out, device="cpu")[0].parameters())
    assert_transformers_matches(model, out)
    reloaded = Tokenizer.from_hf_folder(out)
    assert reloaded.encode("Hello world, 123!") == tokenizer.encode("Hello world, 123!")
    assert reloaded.chat_template == tokenizer.chat_template
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_bf16_export_and_composed_config(tmp_path):
    """A model built from a config alone (no config.json to copy) gets a composed one."""
    model = tiny_model("gemma2", VOCAB)
    out = export(model, to="hf", quant="bf16", out=tmp_path / "g")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma2ForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    model_bf16 = model.to(torch.bfloat16).float()  # the same rounding as the file
    assert_transformers_matches(model_bf16, out)
