"""`velotune generate`, `chat` and `eval` on the shortened demo's adapter (tiny model)."""
from __future__ import annotations

import io
import re

import pytest

import velotune
from velotune.cli import main
from velotune.infer.engine import generate
from velotune.infer.sampling import SamplingParams


def greedy(folder, text: str, n: int) -> str:
    model, tokenizer = velotune.load_model(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=n))[0].text


def test_generate_answers_like_the_library(demo_run, capsys):
    _, run, _ = demo_run
    assert main(["generate", "--adapter", str(run / "adapter"), "--prompt", "Hello", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out == greedy(run / "adapter", "Hello", 12).strip() + "\n"


def test_generate_several_prompts_and_bad_model(demo_run, capsys, tmp_path):
    _, run, _ = demo_run
    assert main(["generate", "--adapter", str(run / "adapter"), "--prompt", "Hi", "--prompt", "Who are you?",
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### Hi\n") and "### Who are you?\n" in out
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert f"{tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().err


def test_chat_streams_keeps_history_and_exits(demo_run, capsys, monkeypatch):
    _, run, _ = demo_run
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n/reset\nHello\n/exit\nnever read\n"))
    assert main(["chat", "--adapter", str(run / "adapter"), "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = greedy(run / "adapter", "Hello", 6).strip()
    assert lines[0].strip() == first                       # the streamed pieces add up to the answer
    assert lines[1] == "(history cleared)" and lines[2].strip() == first
    assert len(lines) == 3                                   # /exit ended it before "never read"


def test_chat_ends_on_ctrl_d(tiny_chat_model, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))     # end of input after one line
    assert main(["chat", "--model", str(tiny_chat_model), "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_eval_reports_the_trained_and_base_loss(demo_run, capsys):
    config, run, _ = demo_run
    records = (run / "metrics.jsonl").read_text()
    after = float(re.findall(r'"eval_loss": ([0-9.]+)', records)[-1])
    before = float(re.findall(r'"eval_loss": ([0-9.]+)', records)[0])
    assert main(["eval", str(config)]) == 0
    trained = capsys.readouterr().out
    assert trained.startswith(str(run / "adapter")) and "on 30 examples" in trained
    assert float(re.search(r"eval loss ([0-9.]+)", trained).group(1)) == pytest.approx(after, abs=1e-4)
    assert main(["eval", str(config), "--base"]) == 0
    base = capsys.readouterr().out
    assert float(re.search(r"eval loss ([0-9.]+)", base).group(1)) == pytest.approx(before, abs=1e-4)
    assert main(["eval", str(config), "--eval_split=0"]) == 2
    assert "needs eval data (eval_split > 0 or eval_dataset)" in capsys.readouterr().err


