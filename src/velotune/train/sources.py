"""The config's data, source by source, as a run reads it: each `dataset` entry's rows (a file, a
`datasets` folder, or the bundled chatterbot corpus), through the user's `transforms`, into
conversations (the `column_template`, or the detected layout; `system_prompt` added where a
conversation has none), split into train and eval, and joined into dialogues
(`dialogue_extension`). `velotune train` and `velotune data` both read data through here, so what
`velotune data` shows is what trains.

Order, and why:
- transforms first, on the rows as the user wrote them, so a transform sees the user's columns;
- the eval split before dialogue extension, per source, so no held-out row is joined into a
  training dialogue; the corpus's split keeps every answer to one question on one side;
- weights last (train/data.py, after tokenizing), so repeated rows are tokenized once.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from velotune.data import (
    ChatSample,
    ColumnTemplate,
    DataError,
    Row,
    Sample,
    apply_template,
    convert_rows,
    extend_dialogues,
    held_out_split,
    read_rows,
)
from velotune.data.chatterbot import chatterbot_rows
from velotune.data.mixing import DataSource, parse_sources
from velotune.data.transforms import TransformReport, apply_transforms
from velotune.train.config import TrainConfig, is_bundled

T = TypeVar("T")


@dataclass
class SourceSamples:
    """One dataset entry's samples and what happened to its rows on the way."""

    source: DataSource
    rows: int                                   # rows read from the file
    train: list[Sample]
    eval: list[Sample] = field(default_factory=list)
    transforms: TransformReport | None = None
    held_rows: int = 0                          # rows held out for eval (before dialogue extension)


def source_rows(path: str, config: TrainConfig) -> tuple[list[Row], TransformReport | None]:
    """The rows of one source, after the transforms (with their report; None without transforms)."""
    if is_bundled(path):
        _, _, names = path.partition(":")
        rows = chatterbot_rows(categories=[name.strip() for name in names.split(",") if name.strip()] or None)
    else:
        rows = read_rows(path)
    if not config.transforms:
        return rows, None
    return apply_transforms(rows, config.transforms)


def to_samples(rows: list[Row], config: TrainConfig) -> list[Sample]:
    """Rows as conversations (or raw text), as the config's template or layout says."""
    if config.column_template is not None and config.output_column is not None:
        template = ColumnTemplate(config.column_template, config.output_column, config.system_prompt)
        return list(apply_template(rows, template))
    samples = convert_rows(rows, config.dataset_format)
    if config.system_prompt is None:
        return samples
    if not any(isinstance(s, ChatSample) for s in samples):
        raise DataError(f"{rows[0].source}: system_prompt applies to conversations, but the rows are raw text "
                        "(the text layout)")
    system = {"role": "system", "content": config.system_prompt}
    return [ChatSample([system, *s.messages], s.where, s.metadata)
            if isinstance(s, ChatSample) and not any(m["role"] == "system" for m in s.messages) else s
            for s in samples]


def extended(samples: list[Sample], config: TrainConfig, name: str) -> list[Sample]:
    if config.dialogue_extension == 1 or not samples:
        return samples
    chats = [s for s in samples if isinstance(s, ChatSample)]
    if len(chats) != len(samples):
        raise DataError(f"{name}: dialogue_extension joins conversations, but the rows are raw text")
    return list(extend_dialogues(chats, config.dialogue_extension, seed=config.seed))


def read_source(source: DataSource, config: TrainConfig, *, split: bool) -> SourceSamples:
    """One source's samples; `split`: hold out `eval_split` of them (seeded)."""
    rows, report = source_rows(source.path, config)
    samples = to_samples(rows, config)
    held: list[Sample] = []
    if split:
        if is_bundled(source.path):
            train, held = held_out_split(samples, config.eval_split, seed=config.seed)  # type: ignore[arg-type]
            samples, held = list(train), list(held)
        else:
            samples, held = held_out(samples, config.eval_split, config.seed, source.path)
    return SourceSamples(source, len(rows) if report is None else report.rows_in, extended(samples, config, source.path),
                         extended(held, config, source.path), report, held_rows=len(held))


def read_sources(config: TrainConfig) -> tuple[list[SourceSamples], list[SourceSamples]]:
    """(train sources, eval sources). Without `eval_dataset`, each train source holds its own
    eval samples (`eval_split`) and there are no eval sources; with it, each eval source's samples
    are in its `train` field (all of that source is one set) and the train sources hold no eval."""
    split = config.eval_dataset is None and config.eval_split > 0
    train = [read_source(source, config, split=split) for source in parse_sources(config.dataset)]
    if config.eval_dataset is None:
        return train, []
    return train, [read_source(source, config, split=False) for source in parse_sources(config.eval_dataset)]


def held_out(items: Sequence[T], fraction: float, seed: int, dataset: str) -> tuple[list[T], list[T]]:
    """(train, eval): a seeded `fraction` of the items held out, the rest in their order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(items)))
    if n_eval >= len(items):
        raise DataError(f"{dataset}: {len(items)} rows are too few for eval_split={fraction}")
    held_set = set(order[:n_eval])
    return ([s for i, s in enumerate(items) if i not in held_set],
            [s for i, s in enumerate(items) if i in held_set])
