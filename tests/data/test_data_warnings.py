"""Rows that would train something unintended are counted and named (`TokenizeReport.warnings`):
answers that are only an end-of-turn token, repeated rows, rows cut at max_seq_length."""
from __future__ import annotations

import json

from velotune.data import load_dataset


def row(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}]}) + "\n"


def test_empty_answers_repeats_and_cut_rows_are_reported(smollm2_tokenizer, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(row("What is 2 + 2?", "4") + row("Say nothing.", "") + row("What is 2 + 2?", "4")
                    + row("Tell me a long story.", "Once upon a time " * 40) + row("And again?", "")
                    + row("Hi", "Hello!"))
    examples, report = load_dataset(data, smollm2_tokenizer, max_seq_length=64)
    assert len(examples) == report.kept == 6                  # warned about, not dropped
    long_tokens = len(smollm2_tokenizer.encode(smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a long story."},
         {"role": "assistant", "content": "Once upon a time " * 40}], tokenize=False), add_special_tokens=False))
    assert report.warnings() == [
        f"2 of 6 rows have only end-of-turn tokens to train on (empty assistant answers teach the model to answer "
        f"nothing): {data} line 2, {data} line 5",
        f"1 row repeats an earlier row (such rows weigh more than the rest): {data} line 3 = {data} line 1",
        f"1 row was cut at max_seq_length 64 (tokens past it are never trained): {data} line 4 ({long_tokens:,} tokens)",
    ]
    empty = examples[1]
    trained = [label for label in empty.labels if label != -100]
    assert smollm2_tokenizer.decode(trained) == "<|im_end|>"      # what an empty answer teaches


def test_clean_data_has_no_warnings(smollm2_tokenizer, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(row("What is 2 + 2?", "4") + row("Hi", "Hello!"))
    assert load_dataset(data, smollm2_tokenizer, max_seq_length=512)[1].warnings() == []
