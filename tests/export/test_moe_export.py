"""Mixture-of-experts exports. Merged Hugging Face folders of Qwen3-MoE (experts written one by
one, router as `mlp.gate`) and gpt-oss (experts stacked, transposed, gate and up interleaved) are
loaded by transformers (the oracle) and compute our logits within 1e-5 in float32, with per-expert
LoRA (and LoRA on the router and attention) merged, also over 4-bit experts. GGUF files carry
llama.cpp's names, shapes and keys for qwen3moe and gpt-oss and read back with the adapted
logits; what llama.cpp's graphs cannot express is refused before anything is written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_transformers_matches, hf_source, merged_export, sample_ids, tiny_model
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, quants

import velotune
from velotune.export import ExportError, export
from velotune.lora import LoraConfig, apply_lora
from velotune.quant.experts4bit import quantize_experts

transformers = pytest.importorskip("transformers")

VOCAB = 160
SOURCES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                                         norm_topk_prob=True, tie_word_embeddings=False)),
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=5, num_experts_per_tok=2, intermediate_size=40,
                                     sliding_window=4, tie_word_embeddings=False)),
}
ADAPTED = ["q_proj", "o_proj", "experts", "router"]


def moe_source(family: str, tmp_path):
    cls, extra = SOURCES[family]
    return hf_source(cls, tmp_path / "base", **extra)


def adapt(model, seed: int = 3):
    with torch.no_grad():
        before = model(sample_ids(VOCAB)).logits
    torch.manual_seed(seed)
    apply_lora(model, LoraConfig(r=4, alpha=8, init=False, target_modules=ADAPTED))
    with torch.no_grad():
        assert (model.eval()(sample_ids(VOCAB)).logits - before).abs().max() > 1e-2   # the adapters matter
    return model


@pytest.mark.parametrize("family", sorted(SOURCES))
def test_merged_export_with_expert_adapters_matches_transformers(family, tmp_path):
    names = merged_export(adapt(moe_source(family, tmp_path)), tmp_path / "merged")
    assert not any("lora" in n for n in names)
    if family == "qwen3_moe":
        assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.5.up_proj.weight"} <= names
    else:
        assert {"model.layers.1.mlp.router.bias", "model.layers.1.mlp.experts.gate_up_proj_bias"} <= names


@pytest.mark.parametrize("family", sorted(SOURCES))
def test_adapters_over_4bit_experts_are_merged_into_the_dequantized_base(family, tmp_path):
    model = moe_source(family, tmp_path)
    assert quantize_experts(model) == 2
    adapt(model)
    out = export(model, to="hf", quant="f32", out=tmp_path / "merged")
    assert_transformers_matches(model, out)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_composed_config_of_a_model_built_from_its_config(family, tmp_path):
    model = tiny_model(family, VOCAB)
    out = export(model, to="hf", out=tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [{"qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}[family]]
    assert_transformers_matches(model, out)
    back, _ = velotune.load_model(out, dtype=torch.float32, device="cpu")
    assert back.config.num_experts == model.config.num_experts


# experts of 32 x 3 rows: whole q8_0 blocks along every row
GGUF_SIZES = {"qwen3_moe": dict(moe_intermediate_size=96), "gpt_oss": dict(intermediate_size=96, tie_word_embeddings=True)}
GGUF_NAMES = {
    "qwen3_moe": {"blk.1.ffn_gate_inp.weight": (5, 64), "blk.1.ffn_gate_exps.weight": (5, 96, 64),
                  "blk.1.ffn_up_exps.weight": (5, 96, 64), "blk.1.ffn_down_exps.weight": (5, 64, 96),
                  "blk.1.attn_q_norm.weight": (16,), "blk.1.ffn_norm.weight": (64,)},
    "gpt_oss": {"blk.1.attn_sinks.weight": (4,), "blk.1.post_attention_norm.weight": (64,),
                "blk.1.ffn_gate_inp.bias": (5,), "blk.1.ffn_gate_exps.bias": (5, 96), "blk.1.ffn_up_exps.bias": (5, 96),
                "blk.1.ffn_down_exps.bias": (5, 64), "blk.1.ffn_gate_exps.weight": (5, 96, 64),
                "blk.1.attn_output.bias": (64,), "output.weight": (320, 64)},
}
GGUF_KEYS = {
    "qwen3_moe": {"qwen3moe.expert_count": 5, "qwen3moe.expert_used_count": 2,
                  "qwen3moe.expert_feed_forward_length": 96},
    "gpt_oss": {"gpt-oss.expert_count": 5, "gpt-oss.expert_used_count": 2, "gpt-oss.expert_feed_forward_length": 96,
                "gpt-oss.attention.sliding_window": 4, "gpt-oss.rope.scaling.type": "yarn",
                "gpt-oss.rope.scaling.factor": 32.0, "gpt-oss.rope.scaling.original_context_length": 64},
}


@pytest.mark.parametrize("family", sorted(GGUF_NAMES))
def test_gguf_layout_follows_llama_cpp_and_carries_the_adapters(family, tmp_path, bpe_tokenizer):
    # gpt-oss with a tied head: llama.cpp's gpt-oss needs output.weight, so it is written anyway
    assert len(bpe_tokenizer) == 300
    model = adapt(tiny_model(family, 320, **GGUF_SIZES[family]))
    path = export(model, to="gguf", quant="q8_0", out=tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    reader = GGUFReader(str(path))
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    types = {t.name: t.tensor_type for t in reader.tensors}
    for name, shape in GGUF_NAMES[family].items():
        assert shapes.get(name) == shape, (name, shapes.get(name))
    assert types["blk.0.ffn_gate_inp.weight"] == Q.F32 and types["blk.0.ffn_down_exps.weight"] == Q.Q8_0
    assert all(types[n] == Q.F32 for n in shapes if n.endswith(".bias"))
    for key, value in GGUF_KEYS[family].items():
        assert reader.fields[key].contents() == pytest.approx(value), key
    f32 = export(model, to="gguf", quant="f32", out=tmp_path / "f32.gguf", tokenizer=bpe_tokenizer)
    back, _ = velotune.load_model(f32, dtype=torch.float32, device="cpu")
    ids = sample_ids(len(bpe_tokenizer), length=10)
    with torch.no_grad():
        want, got = model(ids).logits, back.eval()(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize(("family", "overrides", "message"), [
    ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob=false cannot be expressed"),
    ("qwen3_moe", dict(mlp_only_layers=[0]), r"layers \[0\] are dense"),
    ("gpt_oss", dict(swiglu_limit=5.0), "alpha, limit = \\(1.702, 7.0\\)"),
    ("gpt_oss", dict(attention_bias=False), "loads attention, router and expert biases"),
])
def test_what_llama_cpp_cannot_run_is_refused_before_writing(family, overrides, message, tmp_path, bpe_tokenizer):
    model = tiny_model(family, VOCAB, **overrides)
    with pytest.raises(ExportError, match=message):
        export(model, to="gguf", out=tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_q4_k_m_experts_read_back_as_stored(family, tmp_path, bpe_tokenizer):
    """Stacked expert tensors through the k-quant encoder: our loader puts exactly what gguf-py
    dequantizes into the experts' rows, and the logits stay near the source's."""
    size = {"qwen3_moe": "moe_intermediate_size", "gpt_oss": "intermediate_size"}[family]
    model = tiny_model(family, 320, hidden_size=256, head_dim=64, **{size: 256})
    path = export(model, to="gguf", quant="q4_k_m", out=tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == Q.Q4_K and types["blk.1.ffn_down_exps.weight"] == Q.Q6_K
    back, _ = velotune.load_model(path, dtype=torch.float32, device="cpu")
    up = next(t for t in reader.tensors if t.name == "blk.1.ffn_up_exps.weight")
    stored = quants.dequantize(up.data, up.tensor_type).reshape(5, 256, 256)
    assert np.array_equal(back.get_parameter("model.layers.1.mlp.experts.gate_up_proj")[:, 256:].detach().numpy(),
                          stored)
    ids = sample_ids(len(bpe_tokenizer))
    with torch.no_grad():
        want, got = model(ids).logits, back.eval()(ids).logits
    err = float((got - want).norm() / want.norm())
    assert err <= 0.3, err   # measured 0.19 (qwen3_moe) and 0.16 (gpt_oss): random weights, as for dense ones


def test_mxfp4_experts_load(tmp_path, bpe_tokenizer, monkeypatch):
    """ggml-org's gpt-oss GGUFs keep the experts in MXFP4: such tensors (here written by gguf-py's
    own MXFP4 encoder) load as gguf-py dequantizes them."""
    from velotune.export import gguf as gguf_export

    plain = gguf_export.tensor_type
    monkeypatch.setattr(gguf_export, "tensor_type", lambda name, *a: Q.MXFP4 if "_exps.weight" in name else plain(name, *a))
    model = tiny_model("gpt_oss", 320, intermediate_size=64)
    path = export(model, to="gguf", quant="f32", out=tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    reader = GGUFReader(path)
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert down.tensor_type == Q.MXFP4
    back, _ = velotune.load_model(path, dtype=torch.float32, device="cpu")
    stored = quants.dequantize(down.data, Q.MXFP4).reshape(5, 64, 64)
    assert np.array_equal(back.get_parameter("model.layers.0.mlp.experts.down_proj").detach().numpy(), stored)
