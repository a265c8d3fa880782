"""Reading rows from JSONL, JSON, CSV, Parquet and in-memory datasets, with provenance."""
import json

import pytest

from velotune.data.files import DataError, read_rows


def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    rows = read_rows(path)
    assert [row.data["text"] for row in rows] == ["a", "b", "c"]
    assert [row.line for row in rows] == [1, 3, 4]
    assert rows[1].where == f"{path} line 3"


def test_json_list_and_data_object(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": [{"text": "x"}]}))
    rows = read_rows(listed)
    assert [row.data["text"] for row in rows] == ["a", "b"]
    assert rows[1].where == f"{listed} row 1"
    assert [row.data for row in read_rows(wrapped)] == [{"text": "x"}]


def test_json_suffix_holding_jsonl_is_read_as_jsonl(tmp_path):
    path = tmp_path / "actually_lines.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [(row.data["text"], row.line) for row in read_rows(path)] == [("a", 1), ("b", 2)]


def test_csv_line_numbers_follow_multiline_records(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('name,bio\nAda,"first line\nsecond line"\nAlan,\n')
    rows = read_rows(path)
    assert rows[0].data == {"name": "Ada", "bio": "first line\nsecond line"}
    assert rows[1].data == {"name": "Alan", "bio": ""}
    assert [row.line for row in rows] == [2, 4]


def test_csv_extra_cells_name_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(DataError, match=r"bad\.csv line 3: 1 more value"):
        read_rows(path)


def test_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet
    path = tmp_path / "rows.parquet"
    parquet.write_table(pyarrow.table({"text": ["a", "b", "c"]}), path)
    rows = read_rows(path)
    assert [row.data["text"] for row in rows] == ["a", "b", "c"]
    assert rows[2].where == f"{path} row 2"


def test_dataset_like_object():
    class FakeDataset:
        column_names = ["text"]

        def __iter__(self):
            return iter([{"text": "a"}, {"text": "b"}])

    rows = read_rows(FakeDataset())
    assert [row.data["text"] for row in rows] == ["a", "b"]
    assert rows[1].where == "<FakeDataset with columns ['text']> row 1"


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 3: malformed JSON"):
        read_rows(path)


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"train\.json line 3: malformed JSON"):
        read_rows(path)


@pytest.mark.parametrize("name, content", [("empty.jsonl", "\n\n"), ("empty.json", "[]"),
                                           ("empty.csv", "text\n")])
def test_empty_dataset_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{name}: the dataset is empty"):
        read_rows(path)


def test_non_object_row_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n["not", "a", "row"]\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 2: expected a JSON object.*list"):
        read_rows(path)


def test_unsupported_suffix_and_missing_file(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unsupported dataset file type '\.xlsx'"):
        read_rows(path)
    with pytest.raises(DataError, match="no such dataset file"):
        read_rows(tmp_path / "missing.jsonl")
