"""User row functions (`transforms: ["module:function", ...]`) run over the raw rows before any
formatting: cleaning, filtering, augmentation (back-translation, synonym replacement).

A transform takes one row (a dict of the row's columns; a copy, so it may edit it) and returns:
- a dict: the row, changed or not;
- None: the row is dropped (a filter);
- a list of dicts: several rows in its place (augmentation: include the original to keep it).
Anything else, or an exception, fails naming the row (file and line) and the transform. Rows that
come out keep the provenance of the row that went in, so a later error in formatting or
tokenizing still names the line of the user's file.

Transforms run once: their output is cached as JSON lines under `cache_folder()/transforms`, keyed
by the input rows, the transform names and the source code of their modules, so a changed file or
a changed function runs again and nothing else does (augmentation by a translation model can take
hours; `velotune data` and `velotune train` then share the result). Output rows that JSON cannot
hold (bytes, dates) are not cached, and the run says so.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velotune.data.files import DataError, Row

RowFunction = Callable[[dict[str, Any]], Any]
REPORTED_ROWS = 5          # dropped rows named in the summary


@dataclass
class TransformReport:
    rows_in: int = 0
    rows_out: int = 0
    dropped: int = 0                                        # rows a transform returned None for
    dropped_where: list[str] = field(default_factory=list)  # the first few
    cache: str = ""                                         # "cached at PATH", "read from PATH", or why not

    def summary(self) -> str:
        text = f"transforms: {self.rows_in} rows in, {self.rows_out} out, {self.dropped} dropped"
        if self.dropped_where:
            text += f" (e.g. {', '.join(self.dropped_where)})"
        return f"{text}; {self.cache}" if self.cache else text


def cache_folder() -> Path:
    """$VELOTUNE_CACHE, else $XDG_CACHE_HOME/velotune, else ~/.cache/velotune."""
    if os.environ.get("VELOTUNE_CACHE"):
        return Path(os.environ["VELOTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "velotune"


def resolve_transform(spec: str) -> RowFunction:
    """'module:function' imported from sys.path, then from the current directory (the `velotune`
    command's sys.path does not hold it, and a user's my_cleaning.py usually sits there)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DataError(f"transform {spec!r}: expected 'module:function'")
    try:
        module = _import(module_name)
    except ImportError as exc:
        raise DataError(f"transform {spec!r}: cannot import module {module_name!r} ({exc})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise DataError(f"transform {spec!r}: module {module_name} has no function {attr!r}")
    return function


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != name.split(".")[0] or here in sys.path:
            raise
        sys.path.append(here)                # searched last: never shadows an installed package
        return importlib.import_module(name)


def apply_transforms(rows: Sequence[Row], specs: Sequence[str], *, use_cache: bool = True
                     ) -> tuple[list[Row], TransformReport]:
    """The rows after every transform in order (from the cache when these rows went through
    these functions before)."""
    report = TransformReport(rows_in=len(rows))
    if not specs:
        report.rows_out = len(rows)
        return list(rows), report
    functions = [resolve_transform(spec) for spec in specs]
    path = cache_folder() / "transforms" / f"{cache_key(rows, specs, functions)}.jsonl"
    if use_cache and path.is_file():
        out, report.dropped, report.dropped_where = read_cache(path)
        report.rows_out, report.cache = len(out), f"read from the cache {path}"
        return out, report
    out = list(rows)
    for spec, function in zip(specs, functions):
        out = [new for row in out for new in _run(function, spec, row, report)]
    report.rows_out = len(out)
    if not out:
        raise DataError(f"{rows[0].source}: the transforms {', '.join(specs)} dropped every row")
    if use_cache:
        report.cache = write_cache(path, out, report)
    return out, report


def _run(function: RowFunction, spec: str, row: Row, report: TransformReport) -> list[Row]:
    try:
        result = function(copy.deepcopy(row.data))
    except Exception as exc:
        raise DataError(f"{row.where}: transform {spec} raised {type(exc).__name__}: {exc}") from exc
    if result is None:
        report.dropped += 1
        if len(report.dropped_where) < REPORTED_ROWS:
            report.dropped_where.append(row.where)
        return []
    results = result if isinstance(result, list) else [result]
    for item in results:
        if not isinstance(item, dict):
            raise DataError(f"{row.where}: transform {spec} returned {type(item).__name__} "
                            f"({_short(item)}); a transform returns a dict (the row), a list of dicts, or None "
                            "(drop the row)")
    return [Row(item, row.source, line=row.line, index=row.index, place=row.place) for item in results]


def cache_key(rows: Sequence[Row], specs: Sequence[str], functions: Sequence[RowFunction]) -> str:
    digest = hashlib.sha256()
    for spec, function in zip(specs, functions):
        digest.update(spec.encode())
        digest.update(_source_of(function).encode())
    for row in rows:
        digest.update(json.dumps([row.source, row.line, row.index, row.place, row.data], sort_keys=True,
                                 default=repr).encode())
    return digest.hexdigest()[:32]


def _source_of(function: RowFunction) -> str:
    """The function's module file as it is on disk now (a change anywhere in it may change the
    output; `inspect.getsource` would answer from a stale line cache)."""
    module = inspect.getmodule(function)
    file = getattr(module, "__file__", None)
    if file and Path(file).is_file():
        return Path(file).read_text(encoding="utf-8", errors="replace")
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return repr(function)


def write_cache(path: Path, rows: Sequence[Row], report: TransformReport) -> str:
    try:
        lines = [json.dumps({"source": r.source, "line": r.line, "index": r.index, "place": r.place, "data": r.data},
                            ensure_ascii=False) for r in rows]
    except (TypeError, ValueError) as exc:
        return f"not cached: the output rows hold values JSON cannot store ({exc})"
    header = json.dumps({"dropped": report.dropped, "dropped_where": report.dropped_where})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    partial.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    partial.replace(path)                  # whole or absent: a killed run leaves no half cache
    return f"cached at {path}"


def read_cache(path: Path) -> tuple[list[Row], int, list[str]]:
    with path.open(encoding="utf-8") as handle:
        header = json.loads(next(handle))
        rows = []
        for line in handle:
            record = json.loads(line)
            rows.append(Row(record["data"], record["source"], line=record["line"], index=record["index"],
                            place=record["place"]))
    return rows, header["dropped"], header["dropped_where"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
