"""`velotune export RUN --to awq|gptq`: calibration on the run's own training rows (read from its
config.yaml), said so; generic text, said why, for a bare model folder; the group-size errors."""
from __future__ import annotations

import shutil

import pytest
from safetensors import safe_open

from tests.cli.cli_helpers import write_config
from velotune.cli import main

pytest.importorskip("compressed_tensors")


@pytest.fixture
def run_folder(tiny_chat_model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_chat_model, run / "model")
    write_config(run / "config.yaml", model=str(tiny_chat_model), dataset="chatterbot:ai,greetings",
                 eval_split=0.1, output_dir=str(run), method="full", max_seq_length=128)
    return run


def test_export_calibrates_on_the_run_rows(run_folder, capsys):
    assert main(["export", str(run_folder), "--to", "gptq", "--group-size", "16"]) == 0
    captured = capsys.readouterr()
    assert "tokens of the run's training rows" in captured.err and str(run_folder / "config.yaml") in captured.err
    out = run_folder / "export-gptq"
    assert f"wrote {out}" in captured.out
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").shape == (48, 96 // 16)


def test_bare_model_folder_falls_back_to_generic_text(tiny_chat_model, tmp_path, capsys):
    assert main(["export", str(tiny_chat_model), "--to", "awq", "--group-size", "16",
                 "--out", str(tmp_path / "awq")]) == 0
    err = capsys.readouterr().err
    assert "no config.yaml of a training run" in err and "calibrating on generic chat text" in err
    assert (tmp_path / "awq" / "model.safetensors").is_file()


def test_group_size_errors(run_folder, capsys):
    assert main(["export", str(run_folder), "--to", "awq"]) == 2     # widths 48 and 96: 128/64/32 do not divide
    assert "no group size of 128, 64, 32 divides the input widths [48, 96]; give --group-size (a divisor of 48)" \
        in capsys.readouterr().err
    assert main(["export", str(run_folder), "--to", "gptq", "--group-size", "32"]) == 2
    assert "group size 32 does not divide the input width 48" in capsys.readouterr().err
    assert main(["export", str(run_folder), "--to", "hf", "--group-size", "32"]) == 2
    assert "a group size applies to --to awq/gptq" in capsys.readouterr().err
    assert not (run_folder / "export-awq").exists() and not (run_folder / "export-gptq").exists()
