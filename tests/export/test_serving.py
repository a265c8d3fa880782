"""AWQ/GPTQ W4A16 exports: the packed layout against the compressed-tensors package's own
unpacking, transformers (with compressed-tensors) loading the folder and computing the logits of
velotune's dequantized model, AWQ's rewrites leaving the 16-bit function unchanged, AWQ and GPTQ
beating round-to-nearest on a layer's output error, and the errors for bad requests."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import hf_source, sample_ids, tiny_model
from safetensors.torch import load_file, save_file

import velotune
from velotune.export import ExportError, export
from velotune.export.packing import (dequantize, pack_columns, pack_rows, quantization_config, unpack_columns,
                                     unpack_rows)
from velotune.export.serving import (DEFAULT_SCHEME, RECIPES, LayerQuantizer, Recipe, check_model, quantize_layers, save_w4a16,
                                      storage_dtype)
from velotune.export.w4a16 import awq_scales, diagonal_blocks, gptq, output_error, rtn
from velotune.lora import LoraConfig, apply_lora
from velotune.models.calibration import calibration_ids, layer_arguments, run_with_input_statistics

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402


@pytest.mark.parametrize("shape", [(13, 37), (8, 64), (1, 8), (96, 576)])
def test_packing_matches_compressed_tensors(shape):
    g = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = pack_rows(codes)
    assert torch.equal(packed, pack_to_int32(codes, 4))
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size(shape)), codes)
    assert torch.equal(unpack_rows(packed, shape[1]), codes)
    zeros = torch.randint(-8, 8, (shape[0], 3), generator=g, dtype=torch.int8)
    packed_zeros = pack_columns(zeros)
    assert torch.equal(packed_zeros, pack_to_int32(zeros, 4, packed_dim=0))
    assert torch.equal(unpack_columns(packed_zeros, shape[0]), zeros)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantization_config_is_valid_for_compressed_tensors(symmetric):
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(quantization_config(symmetric, 64, ["lm_head"]))
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.symmetric, weights.group_size, weights.strategy) == (4, symmetric, 64, "group")
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"


def layer_inputs(seed: int = 0, rows: int = 512, cols: int = 256) -> torch.Tensor:
    """Inputs with a few loud channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[:, :4] *= 20.0
    return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_and_gptq_beat_round_to_nearest(symmetric):
    x = layer_inputs()
    h = (x.T @ x).double()
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    plain = output_error(w, rtn(w, 32, symmetric, torch.bfloat16, shrinks=(1.0,)), h)
    clipped = output_error(w, rtn(w, 32, symmetric, torch.bfloat16, torch.diagonal(h).float()), h)
    s = awq_scales([w], h, 32, symmetric, torch.bfloat16)
    scaled = output_error(w, rtn(w * s, 32, symmetric, torch.bfloat16, torch.diagonal(h).float() / s**2), h, 1 / s)
    block_clipped = output_error(w, rtn(w, 32, symmetric, torch.bfloat16, diagonal_blocks(h, 32)), h)
    hessian_rounded = output_error(w, gptq(w, h, 32, symmetric, torch.bfloat16), h)
    act_order = output_error(w, gptq(w, h, 32, symmetric, torch.bfloat16, act_order=True), h)
    assert clipped <= plain and block_clipped <= plain
    assert scaled < 0.9 * plain, (scaled, plain)
    assert hessian_rounded < 0.9 * plain, (hessian_rounded, plain)
    assert act_order < 0.9 * plain, (act_order, plain)


def test_gptq_codes_and_grids_are_in_range():
    x = layer_inputs(2, cols=64)
    w = torch.randn(24, 64) * 3
    q = gptq(w, (x.T @ x).double(), 16, False, torch.float16)
    assert q.codes.dtype == torch.int8 and int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
    assert q.scale.dtype == torch.float16 and q.scale.shape == (24, 4) and q.zero.shape == (24, 4)


def dequantized_folder(folder: Path, out: Path, scale_dtype: torch.dtype | None = None) -> Path:
    """A plain float32 HF folder of the export, dequantized with our unpacking: velotune's
    dequantized model. `scale_dtype`: multiply in that dtype instead of the stored scales' own."""
    out.mkdir()
    tensors = load_file(str(folder / "model.safetensors"))
    plain = {}
    for name, value in tensors.items():
        if name.endswith(".weight_packed"):
            prefix = name[: -len("_packed")]
            rows, cols = tensors[prefix + "_shape"].tolist()
            zero = tensors.get(prefix + "_zero_point")
            scale = tensors[prefix + "_scale"]
            plain[prefix] = dequantize(unpack_rows(value, cols), scale.to(scale_dtype or scale.dtype),
                                       None if zero is None else unpack_columns(zero, rows), torch.float32)
        elif not name.endswith(("_scale", "_zero_point", "_shape")):
            plain[name] = value.float()
    save_file(plain, str(out / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def assert_same_logits(ours, ref, vocab: int) -> None:
    ids = sample_ids(vocab)
    with torch.no_grad():
        expected = ours.eval()(ids).logits
        got = ref(ids).logits
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale, float((got - expected).abs().max() / scale)


def assert_transformers_runs_dequantized(folder: Path, tmp_path: Path, vocab: int) -> None:
    """transformers loads the folder decompressed (compressed-tensors' own unpacking: weights
    bit for bit ours, logits ours); a symmetric one also in its run-compressed form, whose float32
    products are our float32 dequantization's."""
    names = load_file(str(folder / "model.safetensors")).keys()
    assert "model.layers.0.mlp.down_proj.weight_packed" in names and "model.layers.0.mlp.down_proj.weight" not in names
    plain = dequantized_folder(folder, tmp_path / "dequantized")
    ours, _ = velotune.load_model(plain, dtype=torch.float32, device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()
    weights = load_file(str(plain / "model.safetensors"))
    checked = 0
    for name, p in ref.named_parameters():
        if name.endswith("_proj.weight") and ".layers." in name:
            assert torch.equal(p, weights[name]), name
            checked += 1
    assert checked >= 8
    assert_same_logits(ours, ref, vocab)
    symmetric = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]["symmetric"]
    # transformers 5.25 with compressed-tensors 0.20.1 builds its run-compressed skeleton with unpacked zero
    # points, so zero-point checkpoints load there (vLLM loads them) only decompressed
    if symmetric:
        ours32, _ = velotune.load_model(dequantized_folder(folder, tmp_path / "dequantized32", torch.float32),
                                        dtype=torch.float32, device="cpu")
        assert_same_logits(ours32, transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), vocab)


@pytest.mark.parametrize("to,quant,config_class,extra", [
    ("awq", None, "LlamaConfig", dict(tie_word_embeddings=True)),
    ("gptq", None, "LlamaConfig", dict(tie_word_embeddings=False)),
    ("awq", "w4a16", "Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, tie_word_embeddings=True)),
    ("awq", None, "Qwen3Config", dict(head_dim=16, num_key_value_heads=2, tie_word_embeddings=True)),
    ("gptq", "w4a16_asym", "Phi3Config", dict(num_key_value_heads=4, tie_word_embeddings=False,
                                             pad_token_id=0)),
], ids=["awq-llama", "gptq-llama", "awq-gemma2-sym", "awq-qwen3", "gptq-phi3-asym"])
def test_transformers_loads_the_export(tmp_path, bpe_tokenizer, to, quant, config_class, extra):
    model = hf_source(config_class, tmp_path / "base", intermediate_size=96, **extra)
    torch.manual_seed(3)
    apply_lora(model, LoraConfig(r=4, alpha=8, init=False, target_modules="all-linear"))
    model.eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(40).expand(2, 40)
    folder = export(model, to=to, quant=quant, out=tmp_path / "export", tokenizer=bpe_tokenizer, group_size=32,
                    calibration=(ids, positions))
    for n, p in model.named_parameters():       # the live model is left as it was
        assert torch.equal(p, before[n]), n
    config = json.loads((folder / "config.json").read_text())
    scheme = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert scheme["symmetric"] == ((quant or DEFAULT_SCHEME[to]) == "w4a16")
    assert scheme["group_size"] == 32
    assert_transformers_runs_dequantized(folder, tmp_path, 160)


def test_awq_rewrites_keep_the_16bit_function():
    """Folding the scales into norms, up_proj and v_proj rows (grouped-query heads sharing one v
    row) and multiplying the consumers' columns computes what the model computed."""
    model = tiny_model("gemma2", 160, num_key_value_heads=2)   # sandwich norms, (1 + w) weights, GQA
    ids = sample_ids(160, length=24)
    positions = torch.arange(24).expand_as(ids)
    args = layer_arguments(model, ids, positions)
    layer = model.model.layers[0]
    with torch.no_grad():
        expected, hessians = run_with_input_statistics(layer, args[0][0], args[0], lambda n, m: n.endswith("_proj")
                                                       and n.count(".") == 1, torch.float64)
        quantizer = LayerQuantizer(model, RECIPES["awq"], False, 32, torch.float32)
        linears = {p: [layer.get_submodule(p).weight.clone(), None] for p in hessians}
        quantizer._fold_scales(layer, "model.layers.0.", linears, dict(hessians))
        assert any(not torch.allclose(w, layer.get_submodule(p).weight) for p, (w, _) in linears.items())
        for path, (weight, _) in linears.items():
            layer.get_submodule(path).weight.copy_(weight)
        for name, value in quantizer.replaced.items():
            model.get_parameter(name).copy_(value)
        got = layer(args[0][0], *args[0][1:])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())


def test_generic_text_when_no_rows(tmp_path, bpe_tokenizer):
    model = tiny_model("llama", bpe_tokenizer.vocab_size)
    folder = export(model, to="gptq", quant="w4a16", out=tmp_path / "g", tokenizer=bpe_tokenizer)
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 96 // 32)   # 128, 64 do not divide 96
    assert "model.layers.0.mlp.down_proj.weight_zero_point" not in tensors
    assert calibration_ids(bpe_tokenizer)[0].numel() > 100


def test_sharded_folder_holds_the_one_file_folders_tensors(tmp_path, bpe_tokenizer):
    """A small `max_shard_size` splits the folder (with transformers' index) into the same tensors
    the one-file folder holds; writing again into a folder drops the earlier export's files."""
    model = tiny_model("llama", bpe_tokenizer.vocab_size)
    calibration = (torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(0)),
                   torch.arange(24)[None])
    one = save_w4a16(model, bpe_tokenizer, tmp_path / "one", "gptq", "w4a16", 32, calibration)
    whole = load_file(str(one / "model.safetensors"))
    sharded = save_w4a16(model, bpe_tokenizer, tmp_path / "one", "gptq", "w4a16", 32, calibration,
                         max_shard_size=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(sharded.glob("model*.safetensors"))
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    parts = {name: value for f in files for name, value in load_file(str(f)).items()}
    assert parts.keys() == whole.keys() == index["weight_map"].keys()
    assert all(torch.equal(parts[name], whole[name]) for name in whole)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in whole.values())


def test_bad_requests(tmp_path, bpe_tokenizer):
    model = tiny_model("llama", bpe_tokenizer.vocab_size)
    with pytest.raises(ExportError, match="group size 48 does not divide the input width 64 .*--group-size 32"):
        export(model, to="awq", out=tmp_path / "a", tokenizer=bpe_tokenizer, group_size=48)
    with pytest.raises(ExportError, match="'w8a8' is not supported for --to gptq; choose one of w4a16, w4a16_asym"):
        export(model, to="gptq", quant="w8a8", out=tmp_path / "a", tokenizer=bpe_tokenizer)
    with pytest.raises(ExportError, match="calibrated by definition"):
        export(model, to="awq", out=tmp_path / "a", tokenizer=bpe_tokenizer, calibrate=False)
    with pytest.raises(ExportError, match="group size applies to --to awq/gptq"):
        export(model, to="gguf", out=tmp_path / "a.gguf", tokenizer=bpe_tokenizer, group_size=32)
    with pytest.raises(ExportError, match="mixture-of-experts"):
        check_model(tiny_model("qwen3_moe", 160), None)
    assert not (tmp_path / "a").exists()


def test_sequential_calibration_runs_the_layers_the_folder_holds(tmp_path, bpe_tokenizer):
    """With `sequential`, each layer is calibrated on the outputs of the 4-bit layers before it:
    the layer it runs computes what the written folder's layer computes (AWQ's norm and v_proj
    rewrites, biases), and layer 1's codes differ from those calibrated on 16-bit outputs."""
    model = hf_source("Qwen2Config", tmp_path / "base", intermediate_size=96, tie_word_embeddings=True)
    ids = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(5))
    calibration = (ids, torch.arange(40).expand(2, 40))
    sequential = Recipe(awq=True, gptq=True, act_order=True, sequential=True)
    dtype = storage_dtype(model)
    with torch.no_grad():
        quantizer = quantize_layers(model, None, sequential, False, 32, dtype, calibration)
        plain = quantize_layers(model, None, replace(sequential, sequential=False), False, 32, dtype, calibration)
    assert torch.equal(quantizer.quantized["model.layers.0.mlp.down_proj"].codes,
                       plain.quantized["model.layers.0.mlp.down_proj"].codes)
    assert not torch.equal(quantizer.quantized["model.layers.1.mlp.down_proj"].codes,
                           plain.quantized["model.layers.1.mlp.down_proj"].codes)
    folder = save_w4a16(model, None, tmp_path / "awq", "awq", "w4a16_asym", 32, calibration, recipe=sequential)
    written, _ = velotune.load_model(dequantized_folder(folder, tmp_path / "plain"), dtype=torch.float32,
                                     device="cpu")
    args = layer_arguments(written, ids, calibration[1])
    hidden = args[0][0]
    with torch.no_grad():
        for index, layer in enumerate(written.model.layers):
            expected = layer(hidden, *args[index][1:])
            got = quantizer.quantized_layer(index)(hidden, *args[index][1:])
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), float((got - expected).abs().max())
            hidden = expected


def test_symmetric_grid_reaches_both_ends():
    """A symmetric grid's codes run -8..7: a group whose largest magnitude is negative takes the
    -8 end (scale |min| / 8), not |min| / 7, so values on that grid round back exactly."""
    w = torch.tensor([[-0.8, -0.3, 0.0, 0.2, 0.5, 0.7, -0.1, 0.4]]) * 0.5
    q = rtn(w, 8, True, torch.float32, shrinks=(1.0,))
    assert float(q.scale) == pytest.approx(0.05) and int(q.codes.min()) == -8
    assert torch.allclose(q.dequantized(), w, atol=1e-7)
