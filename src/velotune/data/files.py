"""Read raw rows (dicts) from user files or in-memory datasets, each tagged with where it came from.

Every later stage (format conversion, column templates, tokenization) reports errors through
`Row.where`, so a user sees "train.jsonl line 17" instead of "row 16". JSONL and CSV rows carry
their line number (for CSV the line the record starts on, header = line 1); JSON, Parquet and
in-memory rows carry their 0-based index.

Supported inputs:
- `.jsonl` / `.ndjson`: one JSON object per line, blank lines skipped;
- `.json`: a list of objects, or an object holding that list under "data" (or its only list
  value); a `.json` file that is really JSONL is read as JSONL;
- `.csv` / `.tsv`: a header row, then records (values stay strings; empty cells are "");
- `.parquet`: through pyarrow, imported only when needed (`pip install velotune[data]`);
- a folder written by `datasets`' `save_to_disk` (Arrow files, read with pyarrow: `arrow_folder.py`);
- a list of dicts, or a `datasets.Dataset`-like object (has `column_names`, iterates dicts).
  The `datasets` package itself is never imported.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velotune.data.arrow_folder import arrow_records, is_arrow_folder

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}


class DataError(ValueError):
    """A dataset we cannot train on; the message names the file and line (or row) and the field."""


@dataclass(frozen=True)
class Row:
    """One raw record and its provenance."""

    data: dict[str, Any]
    source: str                 # file path, or a description of the in-memory object
    line: int | None = None     # 1-based line (JSONL, CSV)
    index: int | None = None    # 0-based position (JSON, Parquet, Arrow, in-memory)
    place: str | None = None    # where else a record sits, e.g. "conversations[3]" of a corpus file

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"{self.source} line {self.line}"
        if self.place is not None:
            return f"{self.source} {self.place}"
        return f"{self.source} row {self.index}"


def read_rows(source: str | Path | Iterable[dict[str, Any]]) -> list[Row]:
    """All rows of `source` (a path or an in-memory dataset); raises DataError if there are none."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = str(path)
        if is_arrow_folder(path):
            rows = [_as_row(record, name, index=i) for i, record in enumerate(arrow_records(path, DataError))]
        elif path.is_dir():
            raise DataError(f"{path}: a folder, but not one written by `datasets`' save_to_disk (no state.json); "
                            "give a data file or such a folder")
        elif not path.is_file():
            looked = f" (looked for {path.resolve()})" if not path.is_absolute() else ""
            raise DataError(f"{path}: no such dataset file{looked}")
        else:
            rows = list(_read_file(path))
    else:
        name = _describe(source)
        rows = list(_read_in_memory(source, name))
    if not rows:
        raise DataError(f"{name}: the dataset is empty (no rows)")
    return rows


def _read_file(path: Path) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in CSV_DELIMITERS:
        return _read_csv(path, CSV_DELIMITERS[suffix])
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{path}: unsupported dataset file type {suffix!r}; "
        "use .jsonl, .json, .csv, .tsv or .parquet"
    )


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path} line {line_number}: malformed JSON "
                    f"({error.msg} at column {error.colno})"
                ) from None
            yield _as_row(value, str(path), line=line_number)


def _read_json(path: Path) -> Iterator[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":       # several top-level values: the file is JSONL
            return _read_jsonl(path)
        raise DataError(
            f"{path} line {error.lineno}: malformed JSON ({error.msg} at column {error.colno})"
        ) from None
    records = _records_of(value, path)
    return (_as_row(record, str(path), index=i) for i, record in enumerate(records))


def _records_of(value: Any, path: Path) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("data"), list):
            return value["data"]
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) == 1:
            return value[lists[0]]
        raise DataError(
            f"{path}: expected a list of rows, or an object with the rows under 'data'; "
            f"found an object with keys {sorted(value)}"
        )
    raise DataError(f"{path}: expected a list of rows, found a JSON {type(value).__name__}")


def _read_csv(path: Path, delimiter: str) -> Iterator[Row]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        record_start = 2                     # the header is line 1
        for record in reader:
            if None in record:               # more cells than header columns
                raise DataError(
                    f"{path} line {record_start}: {len(record[None])} more value(s) than the "
                    f"{len(reader.fieldnames or [])} header columns"
                )
            yield Row({key: "" if value is None else value for key, value in record.items()},
                      str(path), line=record_start)
            record_start = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow; install it with `pip install velotune[data]`"
        ) from None
    table = parquet.read_table(path)
    return (Row(record, str(path), index=i) for i, record in enumerate(table.to_pylist()))


def _read_in_memory(rows: Iterable[Any], name: str) -> Iterator[Row]:
    for i, record in enumerate(rows):
        yield _as_row(record, name, index=i)


def _as_row(value: Any, source: str, *, line: int | None = None, index: int | None = None) -> Row:
    row = Row(value, source, line=line, index=index)
    if not isinstance(value, dict):
        raise DataError(
            f"{row.where}: expected a JSON object (a row), found {type(value).__name__}")
    return row


def _describe(rows: Any) -> str:
    if hasattr(rows, "column_names"):
        return f"<{type(rows).__name__} with columns {list(rows.column_names)}>"
    return f"<in-memory {type(rows).__name__}>"
