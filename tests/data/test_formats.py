"""Format detection and conversion of alpaca, ShareGPT, messages and raw-text rows."""
import pytest

from velotune.data.files import DataError, Row, read_rows
from velotune.data.formats import ChatSample, TextSample, convert_rows, detect_format


def rows_of(*records):
    return [Row(record, "mem.jsonl", line=i + 1) for i, record in enumerate(records)]


def test_alpaca_with_input_and_system():
    rows = rows_of(
        {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be terse."},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    )
    assert detect_format(rows) == "alpaca"
    first, second = convert_rows(rows)
    assert first == ChatSample([{"role": "system", "content": "Be terse."},
                                {"role": "user", "content": "Add\n\n2 and 3"},
                                {"role": "assistant", "content": "5"}], "mem.jsonl line 1")
    assert second.messages == [{"role": "user", "content": "Say hi"},
                               {"role": "assistant", "content": "hi"}]


def test_sharegpt_roles_are_mapped():
    rows = rows_of(
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                           {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                           {"from": "gpt", "value": "A2"}]},
        {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    )
    assert detect_format(rows) == "sharegpt"
    first, second = convert_rows(rows)
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in first.messages] == ["S", "Q1", "A1", "Q2", "A2"]
    assert second.messages == [{"role": "user", "content": "Q"},
                               {"role": "assistant", "content": "A"}]


def test_messages_pass_through():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    rows = rows_of({"messages": messages, "id": 7})
    assert detect_format(rows) == "messages"
    assert convert_rows(rows)[0].messages == messages


def test_text_rows_become_text_samples():
    rows = rows_of({"text": "Once upon a time."}, {"text": "The end.", "meta": 1})
    assert detect_format(rows) == "text"
    assert convert_rows(rows) == [TextSample("Once upon a time.", "mem.jsonl line 1"),
                                  TextSample("The end.", "mem.jsonl line 2")]


def test_explicit_format_overrides_detection():
    rows = rows_of({"text": "t", "instruction": "i", "output": "o"})
    assert detect_format(rows) == "alpaca"
    assert convert_rows(rows, "text") == [TextSample("t", "mem.jsonl line 1")]


def test_unknown_format_lists_the_choices():
    with pytest.raises(DataError, match="unknown dataset_format 'chatml'; choose one of "
                                        "alpaca, sharegpt, messages, text, auto"):
        convert_rows(rows_of({"text": "t"}), "chatml")


def test_missing_field_names_file_line_and_field(tmp_path, jsonl_writer):
    path = jsonl_writer("train.jsonl", [{"instruction": "a", "output": "b"},
                                        {"instruction": "c", "output": "d"},
                                        {"instruction": "e", "answer": "f"}])
    with pytest.raises(DataError, match=r"train\.jsonl line 3: missing field 'output'"):
        convert_rows(read_rows(path), "alpaca")


def test_missing_field_inside_a_turn(jsonl_writer):
    path = jsonl_writer("chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl line 1: messages\[1\] has missing field "
                                        r"'content'"):
        convert_rows(read_rows(path))


def test_unknown_role_and_no_assistant_are_errors():
    bad_role = rows_of({"conversations": [{"from": "robot", "value": "x"}]})
    with pytest.raises(DataError, match=r"mem\.jsonl line 1: conversations\[0\] has role 'robot'"):
        convert_rows(bad_role)
    no_answer = rows_of({"messages": [{"role": "user", "content": "q"}]})
    with pytest.raises(DataError, match="no assistant turn"):
        convert_rows(no_answer)


def test_undetectable_columns_are_named():
    with pytest.raises(DataError, match=r"mem\.jsonl line 1: cannot tell the dataset format from "
                                        r"columns \['answer', 'question'\]"):
        detect_format(rows_of({"question": "q", "answer": "a"}))


def test_turn_that_is_not_an_object_names_its_index():
    rows = rows_of({"conversations": [{"from": "human", "value": "q"}, 42]})
    with pytest.raises(DataError, match=r"mem\.jsonl line 1: conversations\[1\] must be an object"):
        convert_rows(rows)
