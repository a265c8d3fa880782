"""Bad requests fail with a clear ExportError (or exit status 2 from the CLI) before anything is
loaded or written."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from velotune.cli import main
from velotune.export import ExportError, export


@pytest.mark.parametrize(("to", "quant", "message"), [
    ("gguf", "q4_k_x", "quant type 'q4_k_x' is not supported for --to gguf; choose one of f32, f16"),
    ("ollama", "q3_k_m", "quant type 'q3_k_m' is not supported for --to ollama; choose one of f32, f16"),
    ("hf", "q8_0", "quant type 'q8_0' is not supported for --to hf; choose one of f32, f16, bf16"),
    ("onnx", None, "unknown export target 'onnx'; choose one of hf, gguf, ollama"),
])
def test_bad_target_or_quant_before_the_path_is_read(tmp_path, to, quant, message):
    with pytest.raises(ExportError, match=message.replace("(", r"\(")):
        export(tmp_path / "does-not-exist", to=to, quant=quant)


@pytest.mark.parametrize(("to", "quant", "message"), [
    ("hf", None, "calibration applies to quantized GGUF/Ollama exports, not --to hf"),
    ("gguf", "f16", "calibration applies to quantized types; f16 is not quantized"),
])
def test_calibration_of_an_unquantized_export_is_refused_first(tmp_path, to, quant, message):
    with pytest.raises(ExportError, match=message.replace("(", r"\(")):
        export(tmp_path / "does-not-exist", to=to, quant=quant, calibrate=True)


def test_missing_run_folder(tmp_path):
    with pytest.raises(ExportError, match="no-run: no such run folder, model folder or .gguf file"):
        export(tmp_path / "no-run", to="gguf")


def test_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ExportError, match="not a run folder \\(no adapter/ or model/ inside\\)"):
        export(tmp_path, to="hf")


def test_unsupported_architecture_in_a_run_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ExportError, match="unknown architecture.*gpt2.*supported: llama, mistral"):
        export(tmp_path, to="gguf")
    assert not (tmp_path / "export-gguf").exists()


def test_architecture_feature_gguf_cannot_express(tmp_path, bpe_tokenizer):
    model = tiny_model("gemma2", len(bpe_tokenizer), query_pre_attn_scalar=24)
    with pytest.raises(ExportError, match="query_pre_attn_scalar=24 cannot be expressed in GGUF"):
        export(model, to="gguf", out=tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_needs_a_tokenizer(tmp_path):
    with pytest.raises(ExportError, match="a GGUF needs the tokenizer"):
        export(tiny_model("llama", 64), to="gguf", out=tmp_path / "m.gguf")


def test_cli_reports_and_exits_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--to", "gguf", "--quant", "q4_0"]) == 2
    assert "velotune export: error:" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--to", "gguf", "--quant", "iq2"]) == 2
    assert "quant type 'iq2' is not supported" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--to", "hf", "--no-calibration"]) == 2
    assert "calibration applies to quantized GGUF/Ollama exports" in capsys.readouterr().err


def test_cli_exports_a_run_folder(tmp_path, bpe_tokenizer, capsys):
    from velotune.export.hf import save_hf

    save_hf(tiny_model("qwen2", len(bpe_tokenizer)), bpe_tokenizer, tmp_path / "run" / "model", dtype=torch.float32)
    assert main(["export", str(tmp_path / "run"), "--to", "gguf", "--quant", "q8_0"]) == 0
    written = tmp_path / "run" / "export-gguf" / "model-q8_0.gguf"
    assert written.exists() and str(written) in capsys.readouterr().out
