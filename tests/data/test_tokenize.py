"""Assistant-only labels found from the chat template; truncation and dropping; raw text."""
import pytest

from velotune.data.chatterbot import load_chatterbot
from velotune.data.files import DataError
from velotune.data.formats import ChatSample, TextSample
from velotune.data.tokenize import IGNORE_INDEX, assistant_spans, tokenize_samples

CONVERSATION = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Ahoy, matey."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It be 4, or so says me parrot."},
]
EXPECTED_TURNS = ["Ahoy, matey.<|im_end|>", "It be 4, or so says me parrot.<|im_end|>"]

# Renders the last assistant turn with an (empty) thinking block, like Qwen3's template: the
# rendering of a prefix is then not a prefix of the whole rendering.
NOT_PREFIX_STABLE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last %}<think></think>{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REWRITES_CONTENT = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def trained_runs(example, text, offsets):
    """The text of each maximal run of trained tokens."""
    runs, start = [], None
    for t, label in enumerate(example.labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = t
        if label == IGNORE_INDEX and start is not None:
            runs.append(text[offsets[start][0]:offsets[t - 1][1]])
            start = None
    return runs


def check_labels(tokenizer, messages, expected_turns):
    sample = ChatSample(messages, "chat.jsonl line 1")
    [example], report = tokenize_samples([sample], tokenizer, max_seq_length=4096)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
    assert example.input_ids == ids
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, ids))
    assert trained_runs(example, text, offsets) == expected_turns
    trained = [label for label in example.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "".join(expected_turns)
    assert report.target_tokens == len(trained) and report.kept == 1
    return example


def test_fake_chatml_multi_turn_with_system(fake_tokenizer):
    check_labels(fake_tokenizer, CONVERSATION, EXPECTED_TURNS)


def test_fake_chatml_without_system_uses_template_default(fake_tokenizer):
    text, spans = assistant_spans(ChatSample(CONVERSATION[1:], "x"), fake_tokenizer)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert [text[a:b] for a, b in spans] == EXPECTED_TURNS
    check_labels(fake_tokenizer, CONVERSATION[1:], EXPECTED_TURNS)


def test_template_that_is_not_prefix_stable_falls_back_to_search(make_tokenizer):
    tokenizer = make_tokenizer(NOT_PREFIX_STABLE)
    text = tokenizer.apply_chat_template(CONVERSATION)
    assert "<think></think>It be 4" in text
    check_labels(tokenizer, CONVERSATION, EXPECTED_TURNS)


def test_template_that_rewrites_content_is_a_clear_error(make_tokenizer):
    tokenizer = make_tokenizer(REWRITES_CONTENT)
    with pytest.raises(DataError, match=r"chat\.jsonl line 4: the chat template is not "
                                        r"prefix-stable and changes the text of messages\[1\]"):
        tokenize_samples([ChatSample(CONVERSATION, "chat.jsonl line 4")], tokenizer,
                         max_seq_length=512)


def test_real_smollm2_tokenizer_labels_exactly_the_assistant_turns(smollm2_tokenizer):
    check_labels(smollm2_tokenizer, CONVERSATION, EXPECTED_TURNS)
    check_labels(smollm2_tokenizer, CONVERSATION[1:], EXPECTED_TURNS)
    for sample in load_chatterbot(categories=["ai", "emotion"]):
        expected = [m["content"] + "<|im_end|>" for m in sample.messages if m["role"] == "assistant"]
        check_labels(smollm2_tokenizer, sample.messages, expected)


def test_truncation_and_dropping_are_counted(fake_tokenizer):
    long_answer = ChatSample([{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "word " * 100}], "row 0")
    late_answer = ChatSample([{"role": "user", "content": "talk " * 100},
                              {"role": "assistant", "content": "ok"}], "row 1")
    short = ChatSample([{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}], "row 2")
    examples, report = tokenize_samples([long_answer, late_answer, short], fake_tokenizer,
                                        max_seq_length=64)
    assert (report.total, report.truncated, report.dropped_no_targets, report.kept) == (3, 2, 1, 2)
    assert report.dropped_where == ["row 1"]
    assert [example.where for example in examples] == ["row 0", "row 2"]
    assert len(examples[0]) == 64 and examples[0].labels[-1] != IGNORE_INDEX
    assert report.target_tokens == sum(example.num_targets for example in examples)
    assert "3 examples: 2 kept, 2 truncated, 1 dropped" in report.summary()


def test_all_examples_without_targets_is_an_error(fake_tokenizer):
    sample = ChatSample([{"role": "user", "content": "talk " * 50},
                         {"role": "assistant", "content": "ok"}], "data.jsonl line 1")
    with pytest.raises(DataError, match=r"all 2 examples have no trainable tokens left after "
                                        r"truncation to max_seq_length=32 \(e\.g\. data\.jsonl"):
        tokenize_samples([sample, sample], fake_tokenizer, max_seq_length=32)


@pytest.mark.parametrize("add_bos", [True, False])
def test_raw_text_is_bos_text_eos_all_trained(make_tokenizer, add_bos):
    tokenizer = make_tokenizer(add_bos=add_bos)
    [example], report = tokenize_samples([TextSample("The cat sat.", "books.jsonl line 1")],
                                         tokenizer, max_seq_length=64)
    body = tokenizer.encode("The cat sat.", add_special_tokens=False)
    assert example.input_ids == [0] * add_bos + body + [tokenizer.eos_token_id]
    assert example.labels == example.input_ids
    assert report.target_tokens == len(example.input_ids) - 1


def test_forked_workers_give_the_same_examples_and_counts_in_order(smollm2_tokenizer):
    """Rows split over worker processes come back in order with the same ids, labels and report
    (including dropped rows) as one process."""
    samples = list(load_chatterbot(categories=["ai", "greetings", "humor"]))
    samples.insert(7, ChatSample([{"role": "user", "content": "hi"}], "rows.jsonl:8"))   # nothing to train
    one, one_report = tokenize_samples(samples, smollm2_tokenizer, max_seq_length=48, workers=1)
    many, many_report = tokenize_samples(samples, smollm2_tokenizer, max_seq_length=48, workers=2)
    assert [(e.input_ids, e.labels, e.where) for e in many] == [(e.input_ids, e.labels, e.where) for e in one]
    assert many_report == one_report and one_report.dropped_no_targets >= 1 and one_report.truncated > 0
