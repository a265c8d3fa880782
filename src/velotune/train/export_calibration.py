"""Calibration rows for a quantized export, taken from the run's own training data.

A 4-bit export rounds each layer to keep its output on real inputs (AWQ/GPTQ, calibrated GGUF
types); the inputs that matter are the ones the fine-tune was trained on, so both paths that
export a run use its training rows: the trainer's `export:` entries (the rows it just trained on)
and `velotune export RUN` (the rows that RUN/config.yaml names, read and tokenized the way
`velotune train` did). The rows are spread over the set and packed into short rows
(`methods.calibration_rows`, the batch the quant_error adapter start was measured on).

When there are none -- a model or adapter folder without config.yaml, data that no longer
reads, a preference or RL method whose units are not token rows -- the caller says so and the
export calibrates on generic chat text (`models/calibration.py`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from velotune.train import methods
from velotune.train.run_folder import CONFIG_FILE

Calibration = tuple[torch.Tensor, torch.Tensor]
# AWQ/GPTQ fit H = X^T X [in, in] of every linear, up to the MLP's width; 4,096 tokens leave it
# poorly determined (GPTQ fits the calibration text, not the model), and a W4A16 export has no
# per-row backward pass that would make more rows costly (the dynamic GGUF mix has).
W4A16_TOKENS = 16384


def calibration_tokens(to: str) -> int:
    """Training tokens a calibrated export to `to` runs through the model."""
    return W4A16_TOKENS if to in ("awq", "gptq") else methods.CALIBRATION_TOKENS


def rows_calibration(rows: Sequence[Sequence[int]], tokens: int = methods.CALIBRATION_TOKENS) -> Calibration | None:
    """(ids [B, L], positions [B, L]) of up to `tokens` of training token rows, or None when there
    are none."""
    rows = [row for row in rows if row]
    return methods.calibration_rows(rows, tokens) if rows else None


def run_calibration(run_dir: str | Path, tokenizer: Any, tokens: int = methods.CALIBRATION_TOKENS
                    ) -> tuple[Calibration | None, str]:
    """(calibration batch or None, one line saying where it came from or why there is none)."""
    from velotune.train.config import load_config
    from velotune.train.data import TrainData

    folder = Path(run_dir)
    folder = folder if folder.is_dir() else folder.parent
    config_file = next((f / CONFIG_FILE for f in (folder, folder.parent) if (f / CONFIG_FILE).is_file()), None)
    if config_file is None:
        return None, f"{run_dir}: no {CONFIG_FILE} of a training run, so no training rows to calibrate on"
    if tokenizer is None:
        return None, f"{run_dir}: no tokenizer to tokenize the training rows with"
    try:
        config = load_config(config_file)
        data = methods.load_data(config, tokenizer)
    except (ValueError, OSError) as exc:   # the project's config/data errors are ValueErrors
        return None, f"{config_file}: its training data could not be read ({str(exc).splitlines()[0]})"
    if not isinstance(data, TrainData):
        return None, f"{config_file}: method {config.method}'s data are not token rows"
    calibration = rows_calibration([e.input_ids for e in data.train], tokens)
    if calibration is None:
        return None, f"{config_file}: the training data holds no rows"
    ids = calibration[0]
    return calibration, f"calibrating on {ids.numel():,} tokens of the run's training rows ({config_file})"
