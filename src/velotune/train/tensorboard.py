"""`report_to: [tensorboard]`: the run's numbers, config and held-out answers as TensorBoard event
files in OUTPUT_DIR/tensorboard.

The writer is `torch.utils.tensorboard.SummaryWriter` (torch is already here; it needs the
tensorboard package, `velotune[tensorboard]`), so the files are the ones TensorBoard's own
reader loads (`tests/train/test_tensorboard.py` reads them back with it). It is opt-in, unlike
the first version, which wrote event files whenever the package happened to be importable:
a user could not tell from the config whether a run would write them.

What is written:
- every number of every metrics.jsonl record as a scalar under its own name at its step (loss,
  lr, grad_norm, tokens_per_s, peak_memory_gib, eval_loss, the methods' metrics);
- the run's config (YAML) as text under `config`, at step 0;
- the held-out prompts' answers before and after training as a Markdown table under `samples`,
  at the last step.
A resumed run opens the writer with `purge_step` one past the checkpoint's step, so TensorBoard
drops the interrupted run's later points, as metrics.jsonl does.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """One SummaryWriter over OUTPUT_DIR/tensorboard; `close` flushes."""

    def __init__(self, output_dir: str | Path, *, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter    # needs the tensorboard package (checked in config)

        self.folder = Path(output_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(str(self.folder), purge_step=start_step + 1 if start_step else None)

    def scalars(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def config(self, config_yaml: str) -> None:
        # TensorBoard renders text as Markdown: an indented block keeps the YAML as written
        self.writer.add_text("config", "\n".join("    " + line for line in config_yaml.splitlines()), 0)

    def samples(self, samples: Sequence[tuple[str, str, str]], step: int) -> None:
        """(prompt, before, after) rows as one Markdown table."""
        rows = ["| prompt | before | after |", "|---|---|---|"]
        rows += ["| " + " | ".join(_cell(text) for text in row) + " |" for row in samples]
        self.writer.add_text("samples", "\n".join(rows), step)

    def close(self) -> None:
        self.writer.close()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
