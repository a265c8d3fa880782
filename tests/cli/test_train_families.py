"""`velotune train` through the CLI on a tiny random model of each family issue 20 added (LoRA,
a few steps on the CPU), then the run exported to GGUF and read back with the same logits, and
(mixture-of-experts families, whose adapters sit on the experts) to a merged Hugging Face folder
that transformers runs with the same logits. llama.cpp's own loading of such files is
tests/export/test_llamacpp.py (`make test-llamacpp`)."""
from __future__ import annotations

import json

import pytest
import torch
from tests.cli.cli_helpers import make_chat_model, train_losses, write_config

import velotune
from velotune.cli import main

FAMILIES = {
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=6, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4)),
    "phi4": ("Phi3Config", dict(sliding_window=None, rope_theta=250000.0)),
    "mistral-small": ("MistralConfig", dict(head_dim=24, sliding_window=None)),
    "llama3.2": ("LlamaConfig", dict(head_dim=64, num_attention_heads=2, num_key_value_heads=1, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True)),
    # YaRN as llama.cpp computes it (truncate: true), so the GGUF reads back with the same logits
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                     sliding_window=8, rope_parameters=dict(
                                         rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                         beta_slow=1.0, original_max_position_embeddings=64, truncate=True))),
}
DENSE = {"gemma3", "smollm3", "phi4", "mistral-small", "llama3.2"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_and_export(family, tmp_path):
    cls, extra = FAMILIES[family]
    model_dir = make_chat_model(tmp_path / "model", config_class=cls, gpt2_split=True, **extra)
    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                          {"role": "assistant", "content": f"{2 * a}."}]} for a in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model=str(model_dir), dataset=str(data), output_dir=str(run),
                          method="lora", lora_r=4, lora_alpha=8, max_steps=6, micro_batch_size=4,
                          learning_rate=2e-2, warmup_steps=0, max_seq_length=64, sample_prompts=0,
                          eval_split=0.0, save_steps=0, seed=0)
    assert main(["train", str(config), "--no-progress"]) == 0
    losses = train_losses(run)
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    trained, tokenizer = velotune.load_model(run / "adapter", dtype=torch.float32, device="cpu")
    ids = torch.tensor([tokenizer.encode("What is 3 plus 3?")])
    with torch.no_grad():
        want = trained.eval()(ids).logits
    assert main(["export", str(run), "--to", "gguf", "--quant", "f32"]) == 0
    back, _ = velotune.load_model(run / "export-gguf" / "model-f32.gguf", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert (back.eval()(ids).logits - want).abs().max() <= 1e-4 * want.abs().max()
    if family not in DENSE:
        adapted = {n for n, _ in trained.named_parameters() if "lora" in n}
        assert any(".experts.gate_up_lora_A" in n for n in adapted) and not any("router" in n for n in adapted)
        import transformers

        assert main(["export", str(run), "--to", "hf"]) == 0
        merged = transformers.AutoModelForCausalLM.from_pretrained(run / "export-hf", dtype=torch.float32)
        with torch.no_grad():
            assert (merged.eval()(ids).logits - want).abs().max() <= 1e-5 * want.abs().max()
