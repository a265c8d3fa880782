"""From user data to training examples: read rows, convert to conversations, tokenize and label.

    examples, report = load_dataset("train.jsonl", tokenizer, max_seq_length=2048)

Stages (each usable on its own): `files.read_rows` (rows with provenance; `datasets` save_to_disk
folders through `arrow_folder`), `transforms.apply_transforms` (user row functions, cached),
`formats.convert_rows` (alpaca / sharegpt / messages / text) or `templates.apply_template`
(arbitrary columns), `templates.extend_dialogues`, `tokenize.tokenize_samples` (assistant-only
labels from the chat template), `mixing` (several files by weight), then `batching`
(length-grouped padded batches, or padding-free packing). A training config drives them through
train/sources.py and train/data.py.
Every error is a `DataError` naming the file and line (or row) and the field.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from velotune.data.batching import (
    LengthGroupedSampler,
    collate_packed,
    collate_padded,
    pack_examples,
)
from velotune.data.chatterbot import held_out_split, load_chatterbot
from velotune.data.files import DataError, Row, read_rows
from velotune.data.formats import ChatSample, Sample, TextSample, convert_rows
from velotune.data.templates import ColumnTemplate, apply_template, extend_dialogues
from velotune.data.tokenize import (
    IGNORE_INDEX,
    ChatTokenizer,
    Example,
    TokenizeReport,
    tokenize_samples,
)


def load_samples(source: str | Path | Iterable[dict[str, Any]], *, format: str = "auto",
                 template: ColumnTemplate | None = None, extend_turns: int = 1,
                 seed: int = 0) -> list[Sample]:
    """Rows of `source` as samples; `template` (if given) replaces format detection."""
    rows = read_rows(source)
    samples = apply_template(rows, template) if template else convert_rows(rows, format)
    if extend_turns > 1:
        chats = [sample for sample in samples if isinstance(sample, ChatSample)]
        if len(chats) != len(samples):
            raise DataError(
                f"{rows[0].source}: extend_turns applies to conversations, not raw text")
        samples = list(extend_dialogues(chats, extend_turns, seed=seed))
    return samples


def load_dataset(source: str | Path | Iterable[dict[str, Any]], tokenizer: ChatTokenizer, *,
                 max_seq_length: int, format: str = "auto", template: ColumnTemplate | None = None,
                 extend_turns: int = 1, seed: int = 0) -> tuple[list[Example], TokenizeReport]:
    """Read, convert and tokenize `source` (a file path, a list of dicts or a Dataset)."""
    samples = load_samples(source, format=format, template=template,
                           extend_turns=extend_turns, seed=seed)
    return tokenize_samples(samples, tokenizer, max_seq_length=max_seq_length)


__all__ = [
    "ChatSample", "ChatTokenizer", "ColumnTemplate", "DataError", "Example", "IGNORE_INDEX",
    "LengthGroupedSampler", "Row", "Sample", "TextSample", "TokenizeReport", "apply_template",
    "collate_packed", "collate_padded", "convert_rows", "extend_dialogues", "held_out_split",
    "load_chatterbot", "load_dataset", "load_samples", "pack_examples", "read_rows",
    "tokenize_samples",
]
