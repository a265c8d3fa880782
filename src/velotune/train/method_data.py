"""The data of the preference and RL methods, read as the config says: the dataset's rows (any file
`velotune.data.read_rows` reads; several mixed by weight, through the transforms, as supervised
data: train/sources.py, data/mixing.py), held out as for supervised data (`eval_dataset`, or a
seeded `eval_split` of each source's rows), tokenized into the method's units: pairs (dpo, orpo,
simpo), KTO examples, or GRPO prompts. A GRPO prompt keeps at most max_seq_length - max_completion_length
tokens, so prompt and completion fit in max_seq_length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from velotune.data.files import DataError, Row
from velotune.data.mixing import parse_sources, repeat_by_weight
from velotune.rl.grpo import tokenize_prompts
from velotune.rl.kto import tokenize_kto
from velotune.rl.preference import tokenize_preferences
from velotune.train.config import TrainConfig, is_bundled
from velotune.train.sources import held_out, source_rows

UNIT_NAMES = {"dpo": "pairs", "orpo": "pairs", "simpo": "pairs", "kto": "examples", "grpo": "prompts"}


@dataclass
class UnitData:
    train: list[Any]
    eval: list[Any]
    eval_samples: list[Any] = field(default_factory=list)   # no chat samples to answer (sample_prompts is SFT's)

    def summary(self, dataset: str, method: str) -> str:
        """One line; `dataset` as `data.mixing.describe` writes the config's value."""
        return f"{dataset}: {len(self.train)} train / {len(self.eval)} eval {UNIT_NAMES[method]}"


def read_split(config: TrainConfig) -> tuple[list[Row], list[Row]]:
    """(train rows, eval rows): every source's rows through the transforms, held out per source
    (or `eval_dataset`), then repeated by the source's weight."""
    def rows_of(value: Any, *, split: bool) -> tuple[list[Row], list[Row]]:
        train: list[Row] = []
        held: list[Row] = []
        for number, source in enumerate(parse_sources(value)):
            if is_bundled(source.path):
                raise DataError(f"dataset {source.path!r}: the bundled chatterbot dialogues hold no preferences or "
                                f"prompts for method {config.method}; give a file")
            rows, _ = source_rows(source.path, config)
            kept, out = held_out(rows, config.eval_split, config.seed, source.path) if split else (rows, [])
            train += repeat_by_weight(kept, source.weight, config.seed + number)
            held += repeat_by_weight(out, source.weight, config.seed + number)
        return train, held

    if config.eval_dataset is not None:
        return rows_of(config.dataset, split=False)[0], rows_of(config.eval_dataset, split=False)[0]
    return rows_of(config.dataset, split=config.eval_split > 0)


def tokenize_units(rows: list[Row], config: TrainConfig, tokenizer: Any, first_index: int = 0) -> list[Any]:
    if config.method == "kto":
        return tokenize_kto(rows, tokenizer, max_seq_length=config.max_seq_length)
    if config.method == "grpo":
        return tokenize_prompts(rows, tokenizer, prompt_column=config.prompt_column, first_index=first_index,
                                max_prompt_length=config.max_seq_length - config.max_completion_length)
    return tokenize_preferences(rows, tokenizer, max_seq_length=config.max_seq_length)


def load_units(config: TrainConfig, tokenizer: Any, rows: tuple[list[Row], list[Row]] | None = None) -> UnitData:
    """`rows`: what `read_split(config)` returned (read here when None)."""
    train, held = read_split(config) if rows is None else rows
    # Eval prompts are numbered after the training ones, so no two GRPO prompts share a seed.
    return UnitData(tokenize_units(train, config, tokenizer),
                    tokenize_units(held, config, tokenizer, first_index=len(train)) if held else [])
