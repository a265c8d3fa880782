"""Where training metrics go: a rich progress bar, OUTPUT_DIR/metrics.jsonl, TensorBoard.

metrics.jsonl has one JSON object per line: training records carry step, loss, lr, grad_norm,
tokens_per_s, peak_memory_gib, epoch; evaluation records carry step and eval_loss. It is the
source the end-of-run report is drawn from, and it is appended to when a run resumes (records
after the resumed step, from the interrupted run, are dropped first so the curve has no double).
With `report_to: [tensorboard]` every record also goes to TensorBoard (train/tensorboard.py).
"""
from __future__ import annotations

import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from velotune.train.tensorboard import TensorBoardLog

METRICS_FILE = "metrics.jsonl"


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on a GPU, the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 1 if sys.platform == "darwin" else 1024          # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class RunLog:
    """Progress bar + metrics file (+ TensorBoard when `report_to` names it) for one run; use as a
    context manager. `config_yaml` is written to TensorBoard as the run's config."""

    def __init__(self, output_dir: str | Path, total_steps: int, *, start_step: int = 0,
                 console: Console | None = None, show_progress: bool = True,
                 report_to: Sequence[str] = (), config_yaml: str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        kept = [r for r in read_metrics(self.output_dir) if r.get("step", 0) <= start_step] if start_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.records: list[dict[str, Any]] = kept
        self.tensorboard = TensorBoardLog(self.output_dir, start_step=start_step) if "tensorboard" in report_to else None
        if self.tensorboard is not None and config_yaml is not None and not start_step:
            self.tensorboard.config(config_yaml)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not show_progress, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> RunLog:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.scalars(record)

    def advance(self, step: int, record: dict[str, Any] | None) -> None:
        """Move the bar to `step`; `record` (when this step is logged) refreshes the numbers shown."""
        stats = None
        if record is not None:
            stats = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                     f"{record['tokens_per_s']:,.0f} tok/s  mem {record['peak_memory_gib']:.2f} GiB")
        self.progress.update(self.task, completed=step, **({"stats": stats} if stats else {}))

    def message(self, text: str) -> None:
        self.progress.console.print(text)
