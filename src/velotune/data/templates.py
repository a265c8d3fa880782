"""Build conversations from arbitrary columns, and join single-turn rows into dialogues.

Column template: the user turn is written as a format string over the row's columns, e.g.
    "Describe {name}, born {year}.[[ Also note {extra}.]]"
Parts inside [[...]] are optional: they are dropped when any column they name is empty
(missing, None, or blank), so one template serves rows with and without that column. The
assistant turn is the value of `output_column`. Column names are checked against the dataset's
columns before any row is converted, so a typo fails at once with the list of real columns.
Braces are Python `str.format` syntax: `{{` and `}}` are literal braces.

Dialogue extension: many instruction datasets are single-turn; `extend_dialogues` shuffles the
samples with a seed and concatenates every `n` consecutive ones into one multi-turn
conversation, so the model also learns to answer with earlier turns in context.
"""
from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from velotune.data.files import DataError, Row
from velotune.data.formats import ChatSample

OPTIONAL_PART = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)


@dataclass(frozen=True)
class ColumnTemplate:
    """How to make a 2-turn conversation (plus optional system prompt) from a row's columns."""

    user: str                    # format string over column names, with optional [[...]] parts
    output_column: str           # column holding the assistant's answer
    system: str | None = None    # a fixed system prompt for every conversation

    def fields(self) -> list[str]:
        return _field_names(self.user)


def apply_template(rows: Sequence[Row], template: ColumnTemplate) -> list[ChatSample]:
    """One ChatSample per row; DataError if the template names a column the dataset lacks."""
    columns = sorted({column for row in rows[:64] for column in row.data})
    for name in [*template.fields(), template.output_column]:
        if name not in columns:
            raise DataError(
                f"{rows[0].source}: template uses column {name!r}, which the dataset lacks; "
                f"available columns: {', '.join(columns)}"
            )
    pieces = _split(template.user)
    samples = []
    for row in rows:
        user = "".join(_render(piece, optional, row) for piece, optional in pieces)
        output = row.data.get(template.output_column)
        if _is_empty(output):
            raise DataError(f"{row.where}: output column {template.output_column!r} is empty")
        messages = [{"role": "system", "content": template.system}] if template.system else []
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": str(output)}]
        samples.append(ChatSample(messages, row.where))
    return samples


def extend_dialogues(samples: Sequence[ChatSample], n: int, *, seed: int = 0) -> list[ChatSample]:
    """Shuffle (seeded) and merge every `n` consecutive samples into one multi-turn dialogue.

    The first sample's system prompt is kept; later ones' system prompts are dropped so the
    result stays a valid conversation. The last dialogue holds the remainder (fewer than n).
    """
    if n < 1:
        raise ValueError(f"extend_dialogues: n must be >= 1, got {n}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    dialogues = []
    for start in range(0, len(order), n):
        group = [samples[i] for i in order[start:start + n]]
        messages = list(group[0].messages)
        for sample in group[1:]:
            messages += [m for m in sample.messages if m["role"] != "system"]
        dialogues.append(ChatSample(messages, " + ".join(s.where for s in group)))
    return dialogues


def _field_names(text: str) -> list[str]:
    names = []
    for _, name, _, _ in string.Formatter().parse(text.replace("[[", "").replace("]]", "")):
        if name is not None:
            if not name.isidentifier():
                raise DataError(f"template field {{{name}}} is not a column name")
            names.append(name)
    return names


def _split(text: str) -> list[tuple[str, bool]]:
    """The template as (piece, is_optional) in order."""
    pieces, cursor = [], 0
    for match in OPTIONAL_PART.finditer(text):
        pieces.append((text[cursor:match.start()], False))
        pieces.append((match.group(1), True))
        cursor = match.end()
    pieces.append((text[cursor:], False))
    return pieces


def _render(piece: str, optional: bool, row: Row) -> str:
    names = _field_names(piece)
    empty = [name for name in names if _is_empty(row.data.get(name))]
    if optional and empty:
        return ""
    missing = [name for name in empty if row.data.get(name) is None]
    if missing:
        raise DataError(f"{row.where}: missing field {missing[0]!r} used by the template")
    return piece.format_map({name: row.data[name] for name in names})


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
