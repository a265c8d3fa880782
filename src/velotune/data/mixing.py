"""Several data files mixed into one training set, each with a weight.

    dataset: [{path: a.jsonl, weight: 2}, {path: b.parquet}, c.csv]

A weight says how many times each of the file's rows is seen per epoch: 2 = every row twice,
1 (the default) = once, 0.5 = a seeded half of its rows (a different half for a different seed).
So the share of an epoch that comes from a file is weight x rows over the sum of those products:
exact, and the same for every run with that seed, where sampling each row from a probability
distribution would only match it on average. Repeats are made after tokenizing, so a file's rows
are tokenized (and their problems reported) once, and the duplicate-row warning names only rows
the user wrote twice, not the ones a weight repeats. Eval rows (held out per file, or an
`eval_dataset` list) are repeated by their file's weight too, so the eval loss is that of the mix.
"""
from __future__ import annotations

import difflib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
ENTRY_KEYS = ("path", "weight")


class SourceError(ValueError):
    """A malformed `dataset` entry; `entry` is its 0-based position (None: the value as a whole)."""

    def __init__(self, message: str, entry: int | None = None) -> None:
        super().__init__(message)
        self.entry = entry


@dataclass(frozen=True)
class DataSource:
    path: str
    weight: float = 1.0


def parse_sources(value: str | Sequence[Any]) -> list[DataSource]:
    """A `dataset` value (one path, or a list of paths and {path, weight} mappings) as sources;
    SourceError("entry N ...") for a malformed entry (N counted from 1, as a user counts)."""
    if isinstance(value, str):
        return [DataSource(value)]
    if not value:
        raise SourceError("the list is empty; name at least one data file")
    sources = []
    for number, entry in enumerate(value, start=1):
        if isinstance(entry, str):
            sources.append(DataSource(entry))
            continue
        if not isinstance(entry, dict):
            raise SourceError(f"entry {number} must be a path or a mapping {{path: FILE, weight: N}}, got {entry!r}",
                              number - 1)
        for key in entry:
            if key not in ENTRY_KEYS:
                close = difflib.get_close_matches(str(key), ENTRY_KEYS, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"an entry has {' and '.join(ENTRY_KEYS)}"
                raise SourceError(f"entry {number} has unknown key {key!r} ({hint})", number - 1)
        path, weight = entry.get("path"), entry.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            raise SourceError(f"entry {number} needs 'path' (a data file or folder), got {path!r}", number - 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise SourceError(f"entry {number} ({path}): 'weight' must be a positive number, got {weight!r}",
                              number - 1)
        sources.append(DataSource(path, float(weight)))
    return sources


def repeat_by_weight(items: Sequence[T], weight: float, seed: int) -> list[T]:
    """`items` whole floor(weight) times, then a seeded round(fraction x len) of them (in their order)."""
    whole, fraction = divmod(weight, 1.0)
    out = list(items) * int(whole)
    extra = round(fraction * len(items))
    if extra:
        chosen = sorted(random.Random(seed).sample(range(len(items)), extra))
        out += [items[i] for i in chosen]
    return out


def describe(value: str | Sequence[Any] | None) -> str:
    """A dataset value for messages and the report: the path, or "a.jsonl x2 + b.parquet"."""
    if value is None or isinstance(value, str):
        return str(value)
    try:
        sources = parse_sources(value)
    except SourceError:
        return str(value)
    return " + ".join(s.path + (f" x{s.weight:g}" if s.weight != 1 else "") for s in sources)
