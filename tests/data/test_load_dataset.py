"""The one-call entry: file -> samples -> labelled examples, and on to packed batches."""
import pytest

from velotune.data import (
    ColumnTemplate,
    DataError,
    IGNORE_INDEX,
    collate_packed,
    load_chatterbot,
    load_dataset,
    load_samples,
    pack_examples,
    tokenize_samples,
)


def test_alpaca_file_to_examples(jsonl_writer, fake_tokenizer):
    path = jsonl_writer("train.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"},
                                        {"instruction": "Add", "input": "1 1", "output": "2"}])
    examples, report = load_dataset(path, fake_tokenizer, max_seq_length=128)
    assert [e.where for e in examples] == [f"{path} line 1", f"{path} line 2"]
    trained = [[t for t in e.labels if t != IGNORE_INDEX] for e in examples]
    assert [fake_tokenizer.decode(t) for t in trained] == ["hi<|im_end|>", "2<|im_end|>"]
    assert (report.total, report.kept, report.target_tokens) == (2, 2, 4)


def test_template_and_dialogue_extension(fake_tokenizer):
    rows = [{"city": c, "country": k, "answer": f"{c} is in {k}."}
            for c, k in [("Oslo", "Norway"), ("Lima", "Peru"), ("Rome", "Italy"), ("Kyiv", "Ukraine")]]
    template = ColumnTemplate("Where is {city}?[[ Hint: {country}.]]", "answer")
    samples = load_samples(rows, template=template, extend_turns=2, seed=3)
    assert len(samples) == 2 and all(len(s.messages) == 4 for s in samples)
    examples, report = load_dataset(rows, fake_tokenizer, max_seq_length=256, template=template,
                                    extend_turns=2, seed=3)
    decoded = sorted(fake_tokenizer.decode([t for t in e.labels if t != IGNORE_INDEX])
                     for e in examples)
    assert decoded == sorted(
        "".join(f"{m['content']}<|im_end|>" for m in s.messages if m["role"] == "assistant")
        for s in samples)


def test_extending_raw_text_is_an_error():
    with pytest.raises(DataError, match="extend_turns applies to conversations"):
        load_samples([{"text": "a"}, {"text": "b"}], extend_turns=2)


def test_chatterbot_packs_into_full_rows(fake_tokenizer):
    samples = load_chatterbot(categories=["ai", "greetings"])
    examples, report = tokenize_samples(samples, fake_tokenizer, max_seq_length=256)
    rows = pack_examples(examples, 256)
    batch = collate_packed(rows[:4], pad_id=fake_tokenizer.eos_token_id)
    fill = sum(len(e) for row in rows for e in row) / (256 * len(rows))
    assert report.kept == len(samples) and fill > 0.9
    assert batch["num_target_tokens"] == sum(e.num_targets for row in rows[:4] for e in row)
