"""Preference rows: both layouts, reply tokens found from the chat template, clear errors."""
import pytest

from velotune.data.files import DataError, read_rows
from velotune.rl.preference import collate_pairs, tokenize_preferences


def rows(*dicts):
    return read_rows(list(dicts))


def test_prompt_chosen_rejected_strings(smollm2_tokenizer):
    tok = smollm2_tokenizer
    [ex] = tokenize_preferences(rows({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}),
                                tok, max_seq_length=128)
    assert tok.decode(ex.chosen_ids) == "Paris.<|im_end|>"
    assert tok.decode(ex.rejected_ids) == "Rome.<|im_end|>"
    assert tok.decode(ex.prompt_ids).endswith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_conversation_pairs_share_the_prompt(smollm2_tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    row = {"chosen": chat + [{"role": "assistant", "content": "4"}],
           "rejected": chat + [{"role": "assistant", "content": "5"}]}
    [ex] = tokenize_preferences(rows(row), smollm2_tokenizer, max_seq_length=128)
    assert smollm2_tokenizer.decode(ex.chosen_ids) == "4<|im_end|>"
    assert "Be brief." in smollm2_tokenizer.decode(ex.prompt_ids)


def test_collate_labels_only_replies(smollm2_tokenizer):
    exs = tokenize_preferences(rows({"prompt": "Hi", "chosen": "Hello there!", "rejected": "Go away."}),
                               smollm2_tokenizer, max_seq_length=128)
    batch = collate_pairs(exs, pad_id=0)
    assert batch["input_ids"].shape[0] == 2
    for i, reply in enumerate((exs[0].chosen_ids, exs[0].rejected_ids)):
        labels = batch["labels"][i]
        assert labels[labels != -100].tolist() == reply


def test_truncation_keeps_the_reply_start(smollm2_tokenizer):
    long_prompt = "word " * 300
    [ex] = tokenize_preferences(rows({"prompt": long_prompt, "chosen": "yes", "rejected": "no"}),
                                smollm2_tokenizer, max_seq_length=64)
    assert len(ex.prompt_ids) + len(ex.chosen_ids) <= 64
    assert smollm2_tokenizer.decode(ex.chosen_ids) == "yes<|im_end|>"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, r"row 0: missing field 'rejected'"),
    ({"prompt": "q", "rejected": "a"}, r"row 0: missing field 'chosen'"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "differ before"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be"),
    ({"prompt": [{"role": "user", "content": [{"type": "image", "path": "cat.png"}]}], "chosen": "a", "rejected": "b"},
     r"row 0: field 'prompt' holds content parts \(images\?\); the preference and RL methods train on text only"),
])
def test_bad_rows_are_named(smollm2_tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        tokenize_preferences(rows(row), smollm2_tokenizer, max_seq_length=64)
