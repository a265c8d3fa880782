"""Qwen2.5-VL's GGUF export without llama.cpp: the mmproj file (projector type qwen2.5vl_merger)
read back with gguf-py holds every tower and merger weight in llama.cpp's pieces (q/k/v rows apart,
one patch kernel per frame, the merger's norm as v.post_ln), with the metadata libmtmd reads
(values from config.json and preprocessor_config.json; the window pattern from
fullatt_block_indexes), adapters on the tower and merger merged in; the decoder is llama.cpp's
qwen2vl with the M-RoPE sections; what llama.cpp's
graph fixes and the model does otherwise is refused before any file exists; Ollama's Modelfile names
the projector. llama.cpp running the two files: test_mmproj.py (`make test-llamacpp`)."""
from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from tests.cli.cli_helpers import make_chat_model
from tests.export.test_mmproj import fields, vision_language_model

import velotune
from velotune.export import ExportError, export
from velotune.lora import LoraConfig, apply_lora, merged_linear
from velotune.export import mmproj
from velotune.export.mmproj import window_pattern
from velotune.models.vision import VisionConfig

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

FAMILY = "qwen2_5_vl"
# ours under vision_tower.encoder.layers.N. -> llama.cpp's under v.blk.N.
BLOCK = {"self_attn.out_proj": "attn_out", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def expected_tensors(model) -> dict[str, np.ndarray]:
    """llama.cpp's name -> the value the mmproj file must hold, spelled out per parameter."""
    v = model.config.vision
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    patch = params["vision_tower.embeddings.patch_embedding.weight"]       # [out, C, frames, P, P]
    out = {"v.patch_embd.weight": patch[:, :, 0], "v.patch_embd.weight.1": patch[:, :, 1],
           "v.post_ln.weight": params["multi_modal_projector.norm.weight"]}
    h = v.hidden_size
    for i in range(v.num_hidden_layers):
        layer = f"vision_tower.encoder.layers.{i}."
        out[f"v.blk.{i}.ln1.weight"] = params[layer + "layer_norm1.weight"]   # RMSNorm: no bias
        out[f"v.blk.{i}.ln2.weight"] = params[layer + "layer_norm2.weight"]
        for kind in ("weight", "bias"):
            qkv = params[layer + f"self_attn.qkv.{kind}"]
            out[f"v.blk.{i}.attn_q.{kind}"], out[f"v.blk.{i}.attn_k.{kind}"] = qkv[:h], qkv[h:2 * h]
            out[f"v.blk.{i}.attn_v.{kind}"] = qkv[2 * h:]
            for ours, theirs in BLOCK.items():
                out[f"v.blk.{i}.{theirs}.{kind}"] = params[f"{layer}{ours}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"mm.0.{kind}"] = params[f"multi_modal_projector.linear_1.{kind}"]
        out[f"mm.2.{kind}"] = params[f"multi_modal_projector.linear_2.{kind}"]
    return out


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_mmproj_holds_every_tower_and_merger_weight_and_the_keys_llama_cpp_reads(tmp_path, quant):
    folder, model, tokenizer = vision_language_model(tmp_path, FAMILY)
    text = export(model, to="gguf", quant=quant, out=tmp_path / "out" / "model.gguf", tokenizer=tokenizer)
    assert sorted(p.name for p in text.parent.iterdir()) == ["model-mmproj.gguf", "model.gguf"]
    reader = gguf.GGUFReader(tmp_path / "out" / "model-mmproj.gguf")
    want = expected_tensors(model)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, value in want.items():
        data = np.asarray(got[name].data).reshape(value.shape)
        matrix = value.ndim == 2 and name.endswith("weight")
        assert got[name].tensor_type.name == ("F16" if matrix and quant == "f16" else "F32"), name
        np.testing.assert_array_equal(data, value if data.dtype == np.float32 else value.astype(np.float16), name)

    cfg = json.loads((folder / "config.json").read_text())
    vision = cfg["vision_config"]
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    meta = fields(reader)
    assert meta["general.architecture"] == "clip" and meta["clip.has_vision_encoder"] is True
    assert meta["clip.projector_type"] == "qwen2.5vl_merger"
    assert meta["clip.use_silu"] is True and meta["clip.use_gelu"] is False       # the blocks' gated SiLU
    for key, value in (("image_size", 0), ("patch_size", vision["patch_size"]),    # 0: each image its own size
                       ("embedding_length", vision["hidden_size"]), ("block_count", vision["depth"]),
                       ("feed_forward_length", vision["intermediate_size"]),
                       ("attention.head_count", vision["num_heads"]), ("projection_dim", vision["out_hidden_size"]),
                       ("spatial_merge_size", vision["spatial_merge_size"]),
                       ("n_wa_pattern", vision["fullatt_block_indexes"][0] + 1)):    # block 1 of 3 attends fully
        assert meta[f"clip.vision.{key}"] == value, key
    assert meta["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert meta["clip.vision.image_mean"] == pytest.approx(processor["image_mean"])
    assert meta["clip.vision.image_std"] == pytest.approx(processor["image_std"])
    assert "clip.vision.feature_layer" not in meta

    decoder = gguf.GGUFReader(text)
    names = [t.name for t in decoder.tensors]
    assert not [n for n in names if n.startswith(("v.", "mm."))] and "blk.0.attn_q.bias" in names
    meta = fields(decoder)
    assert meta["general.architecture"] == "qwen2vl"                  # llama.cpp's M-RoPE Qwen 2
    assert meta["qwen2vl.rope.dimension_sections"] == cfg["text_config"]["rope_parameters"]["mrope_section"] + [0]


def test_adapters_on_the_tower_and_merger_are_merged_into_the_pieces(tmp_path):
    """LoRA on every tower and merger linear (init=False: the adapters change the weights): the
    file's q/k/v thirds, MLP and merger matrices are the merged weights, not the base ones."""
    _, model, tokenizer = vision_language_model(tmp_path, FAMILY)
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear", init=False, vision_tower=True))
    export(model, to="gguf", quant="f32", out=tmp_path / "m.gguf", tokenizer=tokenizer)
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "m-mmproj.gguf").tensors}
    for path, pieces in (("vision_tower.encoder.layers.2.self_attn.qkv", ("v.blk.2.attn_q", "v.blk.2.attn_k",
                                                                           "v.blk.2.attn_v")),
                         ("vision_tower.encoder.layers.0.mlp.gate_proj", ("v.blk.0.ffn_gate",)),
                         ("multi_modal_projector.linear_1", ("mm.0",))):
        module = model.get_submodule(path)
        merged = merged_linear(module)
        assert merged is not None, path
        weight = merged[0].detach().numpy()
        assert not np.allclose(weight, module.base_layer.weight.detach().numpy()), path    # the adapter matters
        rows = weight.shape[0] // len(pieces)
        for i, name in enumerate(pieces):
            np.testing.assert_allclose(got[f"{name}.weight"].reshape(rows, -1), weight[i * rows:(i + 1) * rows],
                                       rtol=0, atol=1e-6, err_msg=name)


def test_a_tensor_stored_in_pieces_is_read_once_and_the_file_is_unchanged(tmp_path, monkeypatch):
    """A tower tensor llama.cpp stores as several pieces (the fused q/k/v as three, the two-frame
    patch kernel as two) is read (its adapter merged) once, not once per piece; the file is byte
    for byte the one written when every piece reads its source tensor anew."""
    _, model, tokenizer = vision_language_model(tmp_path, FAMILY)
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear", init=False, vision_tower=True))
    reads: Counter[str] = Counter()
    real_plan = mmproj.plan_tensors

    def counted_plan(*args, **kwargs):
        def counted(t):
            reads[t.name] += 1
            return t.read()
        return [dataclasses.replace(t, read=functools.partial(counted, t)) for t in real_plan(*args, **kwargs)]

    monkeypatch.setattr(mmproj, "plan_tensors", counted_plan)
    once = mmproj.save_mmproj(model, tokenizer, tmp_path / "once.gguf").read_bytes()
    split = {n for n in reads if ".self_attn.qkv." in n or n.endswith("patch_embedding.weight")}
    assert len(split) == 2 * model.config.vision.num_hidden_layers + 1     # q/k/v weight and bias per block
    assert set(reads.values()) == {1}, {n: c for n, c in reads.items() if c > 1}
    reads.clear()
    monkeypatch.setattr(mmproj, "pieces_reader",
                        lambda t: lambda i: mmproj.mmproj_layout(t.name, t.read())[i].numpy())
    each = mmproj.save_mmproj(model, tokenizer, tmp_path / "each.gguf").read_bytes()
    assert {reads[n] for n in split} == {2, 3}              # the per-piece reader reads them 2 or 3 times
    assert once == each


@pytest.mark.parametrize("full, layers, window, pattern", [
    ([7, 15, 23, 31], 32, 112, 8),     # Qwen2.5-VL 3B-72B
    ([1], 3, 112, 2),
    ([], 3, 112, 4),                   # every block windowed: a period past the last block
    ([2], 3, 112, 3),
    ([1], 3, 0, 0),                    # no windows: every block attends fully
    ([0, 2], 3, 112, None),            # not every n-th block
    ([1], 4, 112, None),               # block 3 would be full too
])
def test_window_pattern(full, layers, window, pattern):
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                          image_size=0, patch_size=14, text_hidden_size=64, rotary=True, spatial_merge_size=2,
                          window_size=window, full_attention_layers=tuple(full))
    assert window_pattern(vision) == pattern


@pytest.mark.parametrize("field, value, message", [
    ("window_size", 56, "windows of 112 pixels"),
    ("full_attention_layers", (0,), r"fullatt_block_indexes \[0\] are not so spaced"),
    ("spatial_merge_size", 1, "spatial_merge_size 2, this model 1"),
    ("temporal_patch_size", 1, "temporal_patch_size 2, this model 1"),
    ("rope_theta", 5e5, "rope_theta 10000, this model 500000"),
    ("projector_act", "silu", "merger uses GELU"),
    ("projector_norm_eps", 1e-5, "one epsilon for every norm"),
])
def test_what_llama_cpps_qwen_graph_fixes_is_refused_before_any_file(tmp_path, field, value, message):
    _, model, tokenizer = vision_language_model(tmp_path, FAMILY)
    setattr(model.config.vision, field, value)
    with pytest.raises(ExportError, match=f"qwen2_5_vl: .*{message}"):
        export(model, to="gguf", out=tmp_path / "out" / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


def test_an_mrope_decoder_without_a_llama_cpp_variant_is_refused(tmp_path):
    model, tokenizer = velotune.load_model(make_chat_model(tmp_path / "llama", gpt2_split=True), dtype=torch.float32,
                                           device="cpu")
    model.config.mrope_section = [2, 2, 2]   # head_dim 12
    with pytest.raises(ExportError, match="no M-RoPE .* llama architecture"):
        export(model, to="gguf", out=tmp_path / "out" / "m.gguf", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


def test_ollama_modelfile_names_the_projector(tmp_path):
    folder, _, _ = vision_language_model(tmp_path, FAMILY)
    modelfile = export(folder, to="ollama", out=tmp_path / "ollama")
    assert modelfile.read_text().splitlines()[:2] == ["FROM ./model.gguf", "FROM ./model-mmproj.gguf"]
    assert fields(gguf.GGUFReader(tmp_path / "ollama" / "model-mmproj.gguf"))["clip.projector_type"] == \
        "qwen2.5vl_merger"
