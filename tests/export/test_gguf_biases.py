"""A GGUF holds only the biases llama.cpp's loader for its architecture reads (GGUF_BIASES): Qwen 2
and its M-RoPE variant qwen2vl take q/k/v biases but no o_proj or MLP bias, so such a config is
refused before any file is written, naming the field and the architecture; Llama and Mistral
(written as llama) take all three, and those files read back with the model's logits."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import sample_ids, tiny_model
from gguf import GGUFReader

import velotune
from velotune.export import ExportError, export
from velotune.export.gguf import ARCHITECTURES, BIAS_FIELDS, GGUF_BIASES, MROPE_ARCHITECTURES
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer


def with_fields(family: str, vocab_size: int, **fields) -> Transformer:
    """The tiny random model of `family` with ModelConfig fields set (biases random like its others)."""
    base = tiny_model(family, vocab_size)
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(base.config, **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if ("norm" in name or name.endswith("bias")) else 0.1)
    return model.eval()


@pytest.mark.parametrize(("family", "fields", "message"), [
    ("qwen2", dict(o_bias=True), "qwen2: o_bias (a bias on o_proj) cannot be expressed in a llama.cpp qwen2 GGUF; "
                                 "its qwen2 graph has biases on: q/k/v_proj"),
    ("qwen2", dict(mlp_bias=True), "qwen2: mlp_bias (a bias on gate/up/down_proj) .* llama.cpp qwen2 GGUF"),
    ("qwen2", dict(o_bias=True, mrope_section=[2, 3, 3]), "qwen2: o_bias .* llama.cpp qwen2vl GGUF"),
    ("qwen2", dict(mlp_bias=True, mrope_section=[2, 3, 3]), "qwen2: mlp_bias .* llama.cpp qwen2vl GGUF"),
    ("qwen3", dict(qkv_bias=True, o_bias=True), "qwen3: qkv_bias .* llama.cpp qwen3 GGUF; .* biases on: none"),
])
def test_a_bias_the_architecture_has_no_place_for_is_refused_before_writing(family, fields, message, tmp_path,
                                                                            bpe_tokenizer):
    model = with_fields(family, len(bpe_tokenizer), **fields)
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export(model, to="gguf", out=tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(("family", "fields", "biases"), [
    ("qwen2", {}, {"attn_q", "attn_k", "attn_v"}),
    ("llama", dict(qkv_bias=True, o_bias=True, mlp_bias=True),
     {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}),
    ("mistral", dict(qkv_bias=True, o_bias=True, mlp_bias=True),
     {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}),
])
def test_biases_the_architecture_reads_are_written_and_read_back(family, fields, biases, tmp_path, bpe_tokenizer):
    model = with_fields(family, len(bpe_tokenizer), **fields)
    path = export(model, to="gguf", quant="f32", out=tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    written = {t.name.split(".")[2] for t in GGUFReader(str(path)).tensors if t.name.endswith(".bias")}
    assert written == biases
    back, _ = velotune.load_model(path, dtype=torch.float32, device="cpu")
    ids = sample_ids(len(bpe_tokenizer), length=10)
    with torch.no_grad():
        want, got = model(ids).logits, back.eval()(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_every_architecture_export_writes_has_a_bias_row():
    arches = {*ARCHITECTURES.values(), *MROPE_ARCHITECTURES.values()}
    assert arches <= set(GGUF_BIASES)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(BIAS_FIELDS) <= fields
    assert all(row <= set(BIAS_FIELDS) for row in GGUF_BIASES.values())
