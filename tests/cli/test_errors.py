"""Every failure of the commands is one line naming the file or key: a blocked or runaway chat
template in generate/chat, a non-finite learning rate, a damaged optimizer.pt on resume; data that
would teach empty answers is warned about; `--version`."""
from __future__ import annotations

import io
import json
import shutil

import pytest
import yaml
from tests.cli.cli_helpers import write_config

import velotune
from velotune.cli import main

BLOCKED = "{% for m in messages %}{{ messages.append(m) }}{% endfor %}"      # the sandbox refuses mutation
RUNAWAY = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def with_template(model_dir, tmp_path, template: str):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


@pytest.mark.parametrize("template, reason", [
    (BLOCKED, "the chat template failed on this conversation: SecurityError: access to attribute 'append' of "
              "'list' object is unsafe."),
    (RUNAWAY, "the chat template was stopped: its loops went past 100,000 range() items (a limit no real chat "
              "template comes near)"),
])
def test_a_bad_chat_template_is_one_line_in_generate_and_chat(tiny_chat_model, tmp_path, capsys, monkeypatch,
                                                            template, reason):
    folder = with_template(tiny_chat_model, tmp_path, template)
    assert main(["generate", "--model", str(folder), "--prompt", "Hi"]) == 2
    assert capsys.readouterr().err == f"velotune generate: error: {folder}: {reason}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--model", str(folder)]) == 2
    assert capsys.readouterr().err == f"velotune chat: error: {folder}: {reason}\n"


@pytest.mark.parametrize("value", ["nan", ".inf", "-.inf"])
def test_a_nonfinite_learning_rate_is_refused_in_one_line(value, capsys):
    assert main(["train", f"--learning_rate={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"velotune train: error: command line --learning_rate: key 'learning_rate' must be a "
                          "finite number, got ") and err.count("\n") == 1


def test_a_damaged_optimizer_state_is_named_on_resume(demo_run, tmp_path, capsys):
    _, run, _ = demo_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damaged = copy / "checkpoints" / "step-16" / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])         # a write cut short
    config = write_config(tmp_path / "run.yaml", **{**yaml.safe_load((copy / "config.yaml").read_text()),
                                                     "output_dir": str(copy)})
    assert main(["train", str(config), "--no-progress", "--resume=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"velotune train: error: {damaged}: cannot be read (") and err.count("\n") == 1
    assert err.endswith(f"the checkpoint is damaged: resume from {copy / 'checkpoints' / 'step-8'} "
                        f"(--resume={copy / 'checkpoints' / 'step-8'})\n")


def test_empty_answers_are_warned_about(tiny_chat_model, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "" if i % 4 else "yes"}]
            for i in range(12)]
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    config = write_config(tmp_path / "run.yaml", model=str(tiny_chat_model), dataset="train.jsonl", eval_split=0.0,
                          output_dir=str(tmp_path / "out"), max_steps=1, micro_batch_size=2, lora_r=2, report=False)
    assert main(["train", str(config), "--no-progress"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (f"warning: 9 of 12 rows have only end-of-turn tokens to train on (empty assistant answers teach the "
            f"model to answer nothing): {data} line 2, {data} line 3, {data} line 4, {data} line 6, {data} line 7") in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"velotune {velotune.__version__} (Python 3.")
