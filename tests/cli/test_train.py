"""`velotune train` end to end on a tiny model (the demo, shortened) and its error paths."""
from __future__ import annotations

import json

import pytest
from tests.cli.cli_helpers import write_config

import velotune
from velotune.cli import main
from velotune.train.checkpoint import latest_checkpoint


def test_shortened_demo_trains_and_saves_a_loadable_adapter(demo_run, capsys):
    _, run, code = demo_run
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [0, 8, 16]                   # before, every eval_steps, after
    assert evals[16] < 0.9 * evals[0], evals             # the held-out loss really falls (17% here)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 17))
    model, tokenizer = velotune.load_model(run / "adapter")
    assert tokenizer is not None and model.lora_config.r == 8
    report = (run / "report.md").read_text()
    assert "eval loss" in report and (run / "training.png").stat().st_size > 1000
    assert latest_checkpoint(run).name == "step-16"
    assert (latest_checkpoint(run) / "adapter" / "adapter_config.json").is_file()


def test_resume_after_the_end_only_reevaluates(demo_run, tmp_path):
    config, run, _ = demo_run
    again = write_config(tmp_path / "again.yaml", **{**_load(config), "output_dir": str(tmp_path / "copy")})
    import shutil

    shutil.copytree(run, tmp_path / "copy")
    assert main(["train", str(again), "--no-progress", "--resume=true"]) == 0
    records = [json.loads(line) for line in (tmp_path / "copy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 17))   # no step trained twice


def _load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_unknown_key_fails_with_suggestion(tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", model="x", learnig_rate=1e-3)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config} line 2: unknown key 'learnig_rate' (did you mean 'learning_rate'?)" in err
    assert main(["train", str(config).replace("bad", "none"), "--lora-rank=4"]) == 2
    assert "command line: unknown option --lora_rank (did you mean --lora_r?)" in capsys.readouterr().err


def test_bad_type_on_command_line(tmp_path, capsys):
    assert main(["train", "--max_steps=many"]) == 2
    assert "command line --max_steps: key 'max_steps' must be an integer, got 'many' (str)" in capsys.readouterr().err


def test_data_errors_surface_with_file_and_line(tiny_chat_model, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n')
    config = write_config(tmp_path / "run.yaml", model=str(tiny_chat_model), dataset=str(data),
                          output_dir=str(tmp_path / "out"))
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{data} line 2" in err and "bot" in err
    data.write_text('{"messages": [{"role": "user", "content": "hi"}\n')
    assert main(["train", str(config), "--no-progress"]) == 2
    assert f"{data} line 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--help"], ["chat", "--help"], ["generate", "--help"], ["eval", "--help"]])
def test_help_reads_well(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: velotune {argv[0]}")
    assert {"train": "--key=value", "chat": "/exit", "generate": "--prompt", "eval": "eval split"}[argv[0]] in out


def test_without_a_config_the_defaults_run_and_demo_only_on_request(monkeypatch, capsys):
    """`velotune train --model M --dataset D` runs TrainConfig's defaults (a whole epoch, no
    exports), not the demo's 40 steps and Ollama export; `--demo` runs the demo config."""
    import velotune.train.run as run

    seen = []
    monkeypatch.setattr(run, "train_from_config", lambda config, **kwargs: seen.append(config))
    assert main(["train", "--no-progress", "--model=m", "--dataset=rows.jsonl", "--num_epochs=1"]) == 0
    assert (seen[-1].max_steps, seen[-1].export, seen[-1].output_dir) == (0, [], "runs/velotune")
    assert main(["train", "--demo", "--no-progress", "--max_steps=3"]) == 0
    assert seen[-1].max_steps == 3 and seen[-1].export == ["hf", "ollama:q8_0"] and seen[-1].output_dir == "runs/demo"
    assert main(["train", "--demo", "some.yaml"]) == 2
    assert "--demo runs the bundled demo config; it cannot be combined with some.yaml" in capsys.readouterr().err
