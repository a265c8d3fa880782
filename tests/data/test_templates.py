"""Column templates with optional parts, and merging single-turn rows into dialogues."""
import pytest

from velotune.data.files import DataError, Row
from velotune.data.formats import ChatSample
from velotune.data.templates import ColumnTemplate, apply_template, extend_dialogues

TEMPLATE = ColumnTemplate("Describe {name}, born {year}.[[ Also note {extra}.]]", "bio")


def rows_of(*records):
    return [Row(record, "people.csv", line=i + 2) for i, record in enumerate(records)]


def test_optional_part_kept_or_dropped():
    rows = rows_of({"name": "Ada", "year": 1815, "extra": "she wrote code", "bio": "B1"},
                   {"name": "Alan", "year": 1912, "extra": "", "bio": "B2"},
                   {"name": "Grace", "year": 1906, "bio": "B3"},
                   {"name": "Edsger", "year": 1930, "extra": None, "bio": "B4"})
    users = [sample.messages[0]["content"] for sample in apply_template(rows, TEMPLATE)]
    assert users == ["Describe Ada, born 1815. Also note she wrote code.",
                     "Describe Alan, born 1912.",
                     "Describe Grace, born 1906.",
                     "Describe Edsger, born 1930."]


def test_template_builds_a_two_turn_conversation_with_system():
    template = ColumnTemplate("Q: {q}", "a", system="You answer quizzes.")
    [sample] = apply_template(rows_of({"q": "2+2?", "a": "4"}), template)
    assert sample == ChatSample([{"role": "system", "content": "You answer quizzes."},
                                 {"role": "user", "content": "Q: 2+2?"},
                                 {"role": "assistant", "content": "4"}], "people.csv line 2")


def test_unknown_column_names_it_and_the_available_ones():
    with pytest.raises(DataError, match=r"template uses column 'extra', which the dataset lacks; "
                                        r"available columns: bio, name, year"):
        apply_template(rows_of({"name": "Ada", "year": 1815, "bio": "B"}), TEMPLATE)


def test_required_field_missing_in_one_row_names_the_line():
    rows = rows_of({"name": "Ada", "year": 1815, "extra": "x", "bio": "B1"},
                   {"year": 1912, "extra": "y", "bio": "B2"})
    with pytest.raises(DataError, match=r"people\.csv line 3: missing field 'name'"):
        apply_template(rows, TEMPLATE)


def test_empty_output_names_the_line():
    with pytest.raises(DataError, match=r"people\.csv line 2: output column 'bio' is empty"):
        apply_template(rows_of({"name": "A", "year": 1, "extra": "", "bio": " "}), TEMPLATE)


def single_turns(count):
    return [ChatSample([{"role": "system", "content": f"S{i}"},
                        {"role": "user", "content": f"Q{i}"},
                        {"role": "assistant", "content": f"A{i}"}], f"row {i}")
            for i in range(count)]


def test_extend_dialogues_merges_n_rows_deterministically():
    samples = single_turns(7)
    dialogues = extend_dialogues(samples, 3, seed=1)
    assert [len(d.messages) for d in dialogues] == [7, 7, 3]     # 1 system + 2 per merged row
    for dialogue in dialogues:
        roles = [m["role"] for m in dialogue.messages]
        assert roles == ["system"] + ["user", "assistant"] * ((len(roles) - 1) // 2)
        questions = [m["content"][1:] for m in dialogue.messages if m["role"] == "user"]
        answers = [m["content"][1:] for m in dialogue.messages if m["role"] == "assistant"]
        assert questions == answers                              # each Q stays with its A
        assert dialogue.messages[0]["content"] == f"S{questions[0]}"
        assert dialogue.where == " + ".join(f"row {q}" for q in questions)
    merged = sorted(m["content"] for d in dialogues for m in d.messages if m["role"] == "user")
    assert merged == sorted(f"Q{i}" for i in range(7))
    assert extend_dialogues(samples, 3, seed=1) == dialogues
    assert extend_dialogues(samples, 3, seed=2) != dialogues


def test_extend_dialogues_rejects_zero():
    with pytest.raises(ValueError, match="n must be >= 1"):
        extend_dialogues(single_turns(2), 0)
