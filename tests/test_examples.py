"""Every training config in examples/ runs as shipped, its data included (examples/data, read from
the config's folder), on the CPU with the bundled SmolLM2-135M-Instruct: one optimizer step at
64 tokens a row, the model, output folder and device overridden (the shipped ones name Hub models
and GPUs), every other key as written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from velotune.cli import main
from velotune.train.config import load_config

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
SMALL = ["--model=null", "--device=cpu", "--max_steps=1", "--num_epochs=1", "--micro_batch_size=1",
         "--gradient_accumulation_steps=1", "--max_seq_length=64", "--no-progress"]
PER_METHOD = {"grpo": ["--num_generations=2", "--max_completion_length=8", "--micro_batch_size=2"]}  # whole groups


def test_every_example_is_covered():
    assert {path.stem for path in EXAMPLES} == {"column_template", "dpo", "full_galore", "grpo", "lora_alpaca",
                                               "qlora_llama3_8b"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_runs_as_shipped(path, tmp_path, monkeypatch):
    shipped = load_config(path)
    assert Path(shipped.dataset).is_file()
    monkeypatch.chdir(tmp_path)                    # the data is found from the config's folder, not the cwd
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code = main(["train", str(path), f"--output_dir={tmp_path / 'run'}", *SMALL,
                     *PER_METHOD.get(shipped.method, [])])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    saved = tmp_path / "run" / ("model" if shipped.method == "full" else "adapter")
    assert saved.is_dir() and any(saved.glob("*.safetensors"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1]


def test_own_loop_example_trains(capsys):
    """examples/own_loop.py: the model in a plain PyTorch loop (forward with labels, backward,
    AdamW) lowers the loss of the dialogues it trained on."""
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / "own_loop.py"
    spec = importlib.util.spec_from_file_location("own_loop", path)
    own_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(own_loop)
    before, after = own_loop.main(["--steps", "12", "--probe", "4", "--device", "cpu"])
    assert after < before - 0.2, (before, after)
    assert "0 replays" in capsys.readouterr().out   # on the CPU every step is eager
