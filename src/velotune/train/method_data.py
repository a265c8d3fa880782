"""The data of the preference and RL methods, read as the config says: the dataset's rows (any file
`velotune.data.read_rows` reads), held out as for supervised data (`eval_dataset`, or a seeded
`eval_split` of the rows), tokenized into the method's units: pairs (dpo, orpo, simpo), KTO
examples, or GRPO prompts. A GRPO prompt keeps at most max_seq_length - max_completion_length
tokens, so prompt and completion fit in max_seq_length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from velotune.data.files import DataError, Row, read_rows
from velotune.rl.grpo import tokenize_prompts
from velotune.rl.kto import tokenize_kto
from velotune.rl.preference import tokenize_preferences
from velotune.train.config import CHATTERBOT, TrainConfig
from velotune.train.data import held_out

UNIT_NAMES = {"dpo": "pairs", "orpo": "pairs", "simpo": "pairs", "kto": "examples", "grpo": "prompts"}


@dataclass
class UnitData:
    train: list[Any]
    eval: list[Any]
    eval_samples: list[Any] = field(default_factory=list)   # no chat samples to answer (sample_prompts is SFT's)

    def summary(self, dataset: str, method: str) -> str:
        return f"{dataset}: {len(self.train)} train / {len(self.eval)} eval {UNIT_NAMES[method]}"


def read_split(config: TrainConfig) -> tuple[list[Row], list[Row]]:
    """(train rows, eval rows)."""
    if config.dataset == CHATTERBOT or config.dataset.startswith(CHATTERBOT + ":"):
        raise DataError(f"dataset {config.dataset!r}: the bundled chatterbot dialogues hold no preferences or prompts "
                        f"for method {config.method}; give a file")
    rows = read_rows(config.dataset)
    if config.eval_dataset:
        return rows, read_rows(config.eval_dataset)
    if config.eval_split == 0:
        return rows, []
    return held_out(rows, config.eval_split, config.seed, config.dataset)


def tokenize_units(rows: list[Row], config: TrainConfig, tokenizer: Any, first_index: int = 0) -> list[Any]:
    if config.method == "kto":
        return tokenize_kto(rows, tokenizer, max_seq_length=config.max_seq_length)
    if config.method == "grpo":
        return tokenize_prompts(rows, tokenizer, prompt_column=config.prompt_column, first_index=first_index,
                                max_prompt_length=config.max_seq_length - config.max_completion_length)
    return tokenize_preferences(rows, tokenizer, max_seq_length=config.max_seq_length)


def load_units(config: TrainConfig, tokenizer: Any) -> UnitData:
    train, held = read_split(config)
    # Eval prompts are numbered after the training ones, so no two GRPO prompts share a seed.
    return UnitData(tokenize_units(train, config, tokenizer),
                    tokenize_units(held, config, tokenizer, first_index=len(train)) if held else [])
