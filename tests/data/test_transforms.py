"""User row functions (`transforms`): applied before formatting, run once and cached, and a
function that raises or returns a bad row fails naming the file and line."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from velotune.data import DataError, read_rows
from velotune.data.transforms import apply_transforms

PLUGIN = '''
import json, os

def log_call(row):
    with open(os.environ["CALLS_FILE"], "a") as handle:
        handle.write(json.dumps(row) + "\\n")

def clean(row):
    """Strip, drop rows without an answer, and add a lower-case variant of each question."""
    log_call(row)
    if not row["output"].strip():
        return None
    row = {**row, "instruction": row["instruction"].strip()}
    return [row, {**row, "instruction": row["instruction"].lower()}]

def shout(row):
    return {**row, "output": row["output"].upper()}

def broken(row):
    if row["instruction"].startswith("Boom"):
        raise KeyError("no such column")
    return row

def bad(row):
    return "not a row" if "2" in row["instruction"] else row
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    module = tmp_path / "plugins" / "my_cleaning.py"
    module.parent.mkdir()
    module.write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    monkeypatch.syspath_prepend(str(module.parent))
    monkeypatch.delitem(sys.modules, "my_cleaning", raising=False)      # each test imports its own file
    monkeypatch.setenv("VELOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CALLS_FILE", str(tmp_path / "calls.jsonl"))
    return module


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


ROWS = [{"instruction": "  What is 1 + 1? ", "output": "two"}, {"instruction": "Say nothing", "output": " "},
        {"instruction": "Boom 2", "output": "three"}]


def test_transforms_clean_filter_augment_in_order_and_keep_lines(plugin, tmp_path):
    data = write(tmp_path / "train.jsonl", ROWS)
    rows, report = apply_transforms(read_rows(data), ["my_cleaning:clean", "my_cleaning:shout"])
    assert [row.data for row in rows] == [
        {"instruction": "What is 1 + 1?", "output": "TWO"}, {"instruction": "what is 1 + 1?", "output": "TWO"},
        {"instruction": "Boom 2", "output": "THREE"}, {"instruction": "boom 2", "output": "THREE"}]
    assert [row.where for row in rows] == [f"{data} line {n}" for n in (1, 1, 3, 3)]
    assert (report.rows_in, report.rows_out, report.dropped, report.dropped_where) == (3, 4, 1, [f"{data} line 2"])
    assert report.cache.startswith("cached at ")


def test_transforms_run_once_then_come_from_the_cache(plugin, tmp_path):
    data = write(tmp_path / "train.jsonl", ROWS)
    calls = tmp_path / "calls.jsonl"
    first, _ = apply_transforms(read_rows(data), ["my_cleaning:clean"])
    assert len(calls.read_text().splitlines()) == 3
    again, report = apply_transforms(read_rows(data), ["my_cleaning:clean"])
    assert len(calls.read_text().splitlines()) == 3                     # not called again
    assert again == first and report.cache.startswith("read from the cache") and report.dropped == 1
    write(data, ROWS + [{"instruction": "New", "output": "row"}])           # changed data: run again
    apply_transforms(read_rows(data), ["my_cleaning:clean"])
    assert len(calls.read_text().splitlines()) == 3 + 4
    plugin.write_text(plugin.read_text() + "\n# changed\n")                 # changed code: run again
    apply_transforms(read_rows(data), ["my_cleaning:clean"])
    assert len(calls.read_text().splitlines()) == 3 + 4 + 4


def test_a_raising_transform_names_the_row_and_the_function(plugin, tmp_path):
    data = write(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=rf"{data} line 3: transform my_cleaning:broken raised KeyError: "
                                        "'no such column'"):
        apply_transforms(read_rows(data), ["my_cleaning:broken"])


def test_a_bad_return_names_the_row(plugin, tmp_path):
    data = write(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=rf"{data} line 3: transform my_cleaning:bad returned str \('not a row'\); "
                                        "a transform returns a dict"):
        apply_transforms(read_rows(data), ["my_cleaning:bad"])


def test_unknown_functions_fail_before_any_row(plugin, tmp_path):
    rows = read_rows(write(tmp_path / "train.jsonl", ROWS))
    with pytest.raises(DataError, match="transform 'my_cleaning:nope': module my_cleaning has no function 'nope'"):
        apply_transforms(rows, ["my_cleaning:nope"])
    with pytest.raises(DataError, match="cannot import module 'not_there'"):
        apply_transforms(rows, ["not_there:f"])


def test_a_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "here_cleaning.py").write_text("def keep(row):\n    return {**row, 'kept': 'yes'}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.setenv("VELOTUNE_CACHE", str(tmp_path / "cache"))
    rows, _ = apply_transforms(read_rows([{"a": "1"}]), ["here_cleaning:keep"])
    assert rows[0].data == {"a": "1", "kept": "yes"}
