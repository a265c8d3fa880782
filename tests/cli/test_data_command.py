"""`velotune data`: the first rows as training sees them, the trained tokens marked exactly where the
labels are, and the statistics (kept, dropped, truncated with file:line, warnings)."""
from __future__ import annotations

import json
import re

from tests.cli.cli_helpers import write_config

from velotune.cli import main

END = "<|im_end|>"
HEADER = re.compile(r"^── row (\d+): (.+) \((\d+) tokens, (\d+) trained\)$", re.MULTILINE)


def chat(*turns: str) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": text}
                         for i, text in enumerate(turns)]}


ROWS = [chat("What is 2 + 2?", "4"),
        chat("Name a colour.", "Blue.", "Another one?", "Green, or red."),
        chat("Tell me everything about " + "the sea " * 20, "Salt."),        # cut before its answer: dropped
        chat("Say nothing.", ""),                                            # only the end-of-turn token trains
        chat("What is 2 + 2?", "4"),                                         # a repeat of line 1
        chat("Sing.", "la " * 30)]                                           # cut inside its answer: kept


def rows_shown(output: str) -> list[tuple[str, int, int, str]]:
    """(where, tokens, trained, rendered text) per row block."""
    heads = list(HEADER.finditer(output))
    ends = [m.start() for m in heads[1:]] + [output.index("\nstatistics")]
    return [(m.group(2), int(m.group(3)), int(m.group(4)), output[m.end() + 1:end]) for m, end in zip(heads, ends)]


def test_rows_marked_as_the_labels_and_statistics(tiny_chat_model, tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    config = write_config(tmp_path / "run.yaml", model=str(tiny_chat_model), dataset="small.jsonl", eval_split=0.0,
                          max_seq_length=96, micro_batch_size=2)
    assert main(["data", str(config), "--rows", "9"]) == 0
    out = capsys.readouterr().out
    shown = rows_shown(out)
    assert [where for where, *_ in shown] == [f"{data} line {n}" for n in (1, 2, 4, 5, 6)]
    expected_marked = [["4" + END], ["Blue." + END, "Green, or red." + END], [END], ["4" + END]]
    for (where, tokens, trained, text), marked in zip(shown, expected_marked):
        assert re.findall("«(.*?)»", text, re.DOTALL) == marked, where
        assert trained == sum(len(piece.replace(END, "x").encode()) for piece in marked)   # bytes + 1 per end marker
        assert text.replace("«", "").replace("»", "").startswith("<|im_start|>user\n")
    where, tokens, trained, text = shown[4]                  # line 6 is cut inside its answer: no end marker
    assert tokens == 96
    [cut] = re.findall("«(.*?)»", text, re.DOTALL)
    assert ("la " * 30).startswith(cut) and END not in cut and trained == len(cut)
    assert f"kept 5, dropped 1 (no trainable token left): {data} line 3, truncated 2 at max_seq_length 96: " \
           f"{data} line 3 (" in out and f"{data} line 6 (" in out
    targets = [2, len("Blue.") + 1 + len("Green, or red.") + 1, 1, 2, len(cut)]
    assert f"target tokens per row: mean {sum(targets) / 5:.1f}, median 2, min 1, max {max(targets)}" in out
    histogram = re.findall(r"^\s+(\d+)-(\d+)\s+(\d+)", out, re.MULTILINE)
    assert sum(int(count) for *_, count in histogram) == 5 and histogram[-1][1] == "96"
    assert int(histogram[0][0]) == min(tokens for _, tokens, _, _ in shown)
    assert f"warning: 1 of 5 rows have only end-of-turn tokens to train on" in out and f"{data} line 4" in out
    assert f"1 row repeats an earlier row (such rows weigh more than the rest): {data} line 5 = {data} line 1" in out
    assert "packing at max_seq_length 96: 5 rows fill" in out


def test_statistics_only_and_errors(tiny_chat_model, tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    config = write_config(tmp_path / "run.yaml", model=str(tiny_chat_model), dataset=str(data), eval_split=0.0)
    assert main(["data", str(config), "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "── row" not in out and "kept 2, dropped 0" in out and "no warnings" in out
    assert main(["data", str(config), "--max_seq_lenght=64"]) == 2
    assert "did you mean --max_seq_length?" in capsys.readouterr().err


def test_preference_data_is_counted_in_its_units(tiny_chat_model, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."}) + "\n"
                             for i in range(10)), encoding="utf-8")
    config = write_config(tmp_path / "run.yaml", model=str(tiny_chat_model), method="dpo",
                          dataset=[{"path": str(pairs), "weight": 2}], eval_split=0.2)
    assert main(["data", str(config)]) == 0
    assert f"{pairs} x2: 16 train / 4 eval pairs" in capsys.readouterr().out
