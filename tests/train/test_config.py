"""TrainConfig from YAML + command line, and every bad input named by key and origin."""
from __future__ import annotations

import math

import pytest
import torch

from velotune.train.config import TrainConfigError, load_config
from velotune.train.schedule import build_scheduler, lr_factor, warmup_steps_for


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, "method: lora\nlearning_rate: 2e-4\nmax_steps: 10\ntarget_modules: [q_proj]\n")
    config = load_config(path, ["--max-steps=25", "--packing", "true", "--target_modules=[q_proj,v_proj]",
                                "--model=null", "--resume=runs/x"])
    assert config.method == "lora"
    assert config.learning_rate == 2e-4                      # PyYAML reads "2e-4" as a string
    assert config.max_steps == 25 and config.packing is True
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.model is None and config.resume == "runs/x"
    assert load_config(None, ["--target_modules=q_proj"]).target_modules == ["q_proj"]


def test_unknown_key_in_file_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "method: lora\n\nlearnign_rate: 1.0e-4\n")
    with pytest.raises(TrainConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path} line 3: unknown key 'learnign_rate' (did you mean 'learning_rate'?)"


def test_unknown_option_on_command_line():
    with pytest.raises(TrainConfigError) as info:
        load_config(None, ["--micro_batchsize=4"])
    assert str(info.value) == "command line: unknown option --micro_batchsize (did you mean --micro_batch_size?)"
    with pytest.raises(TrainConfigError, match="valid keys: model, dataset"):
        load_config(None, ["--zzz=1"])


@pytest.mark.parametrize("text, message", [
    ("max_steps: ten\n", "line 1: key 'max_steps' must be an integer, got 'ten' (str)"),
    ("packing: 1\n", "line 1: key 'packing' must be true or false, got 1 (int)"),
    ("learning_rate: fast\n", "line 1: key 'learning_rate' must be a number, got 'fast' (str)"),
    ("target_modules: {q: 1}\n", "line 1: key 'target_modules' must be a list of strings"),
    ("method: grpo\n", "line 1: key 'method' grpo needs at least one reward function in key 'rewards'"),
    ("dpo_loss: hinge\n", "key 'dpo_loss' must be one of sigmoid, ipo"),
    ("method: lroa\n", "line 1: key 'method' must be one of lora, qlora, full, dpo, orpo, kto, simpo, grpo, got 'lroa'"),
    ("lr_scheduler: step\n", "key 'lr_scheduler' must be one of linear, cosine, constant"),
    ("micro_batch_size: 0\n", "key 'micro_batch_size' must be at least 1, got 0"),
    ("eval_split: 1.5\n", "key 'eval_split' must be in [0, 1), got 1.5"),
    ("- a\n- b\n", "expected a mapping of keys to values"),
    ("max_steps: [\n", "not valid YAML"),
    ("export: [gguf:q9_9]\n", "key 'export' has an entry 'gguf:q9_9' that cannot be exported"),
    ("export: [zip]\n", "unknown export target 'zip'"),
    ("cuda_graphs: always\n", "key 'cuda_graphs' must be true, false or auto"),
    ("learning_rate: .inf\n", "line 1: key 'learning_rate' must be a finite number, got inf"),
    ("learning_rate: nan\n", "line 1: key 'learning_rate' must be a finite number, got nan"),
    ("learning_rate: -.inf\n", "line 1: key 'learning_rate' must be a finite number, got -inf"),
    ("max_grad_norm: .nan\n", "line 1: key 'max_grad_norm' must be a finite number, got nan"),
    ("on_nonfinite: ignore\n", "line 1: key 'on_nonfinite' must be one of stop, skip"),
    ("divergence_ratio: 0.5\n", "line 1: key 'divergence_ratio' must be above 1 (or 0 to never warn)"),
    ("resume_allow_changes: [max_step]\n", "unknown key 'max_step' (did you mean 'max_steps'?)"),
    ("router_aux_loss_coef: -0.1\n", "line 1: key 'router_aux_loss_coef' must not be negative"),
    ("router_aux_loss_coef: lots\n", "key 'router_aux_loss_coef' must be a number or null"),
])
def test_bad_values_name_the_key_and_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(TrainConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_bad_value_on_command_line_names_the_option():
    with pytest.raises(TrainConfigError) as info:
        load_config(None, ["--lora_r=2.5"])
    assert str(info.value) == "command line --lora_r: key 'lora_r' must be an integer, got 2.5 (float)"
    with pytest.raises(TrainConfigError, match=r"--max_steps needs a value \(--max_steps=VALUE\)"):
        load_config(None, ["--max_steps"])
    with pytest.raises(TrainConfigError, match="config file not found"):
        load_config("/nonexistent/run.yaml")


def test_schedules():
    warm = warmup_steps_for(0, 0.1, 50)
    assert warm == 5
    linear, cosine, constant = (lr_factor(kind, 4, 20) for kind in ("linear", "cosine", "constant"))
    assert [linear(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert linear(4) == 1.0 and linear(12) == 0.5 and math.isclose(linear(19), 1 / 16)
    assert cosine(4) == 1.0 and math.isclose(cosine(12), 0.5) and math.isclose(cosine(19), 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert constant(3) == 0.8 and constant(19) == 1.0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, "linear", 4, 20)
    seen = []
    for _ in range(20):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert math.isclose(seen[0], 0.02) and math.isclose(seen[12], 0.05) and min(seen) > 0


def test_bundled_demo_and_examples_are_valid_configs():
    from pathlib import Path

    from velotune.cli.train import demo_config_path
    from velotune.train.methods import lora_config

    demo = load_config(demo_config_path())
    assert demo.method == "lora" and demo.model is None and demo.dataset.startswith("chatterbot:ai,")
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        config = load_config(path)
        if config.uses_lora:
            assert len(lora_config(config).targets()) == 7, path


def test_galore_only_with_full_fine_tuning():
    with pytest.raises(TrainConfigError, match="galore needs method: full"):
        load_config(None, ["--optimizer=galore"])
    assert load_config(None, ["--optimizer=galore", "--method=full"]).optimizer == "galore"


def test_data_paths_in_a_config_file_are_read_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("{}\n")
    (folder / "run.yaml").write_text("dataset: data/train.jsonl\neval_dataset: data/train.jsonl\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(folder / "run.yaml")
    assert config.dataset == config.eval_dataset == str(folder / "data" / "train.jsonl")
    # On the command line a relative path is the shell's: read from the current directory.
    assert load_config(folder / "run.yaml", ["--dataset=mine.jsonl"]).dataset == "mine.jsonl"
    assert load_config(None, ["--dataset=chatterbot:ai"]).dataset == "chatterbot:ai"

    (folder / "bad.yaml").write_text("model: null\ndataset: data/missing.jsonl\n")
    with pytest.raises(TrainConfigError) as info:
        load_config(folder / "bad.yaml")
    assert str(info.value) == (
        f"{folder / 'bad.yaml'} line 2: key 'dataset': no file 'data/missing.jsonl' in the config's folder "
        f"(looked for {folder / 'data' / 'missing.jsonl'}; relative paths in a config file are read from its folder)")
