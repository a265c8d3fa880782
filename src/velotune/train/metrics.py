"""Where training metrics go: a rich progress bar, OUTPUT_DIR/metrics.jsonl, TensorBoard.

metrics.jsonl has one JSON object per line: training records carry step, loss, lr, grad_norm,
tokens_per_s, peak_memory_gib, epoch; evaluation records carry step and eval_loss. It is the
source the end-of-run report is drawn from, and it is appended to when a run resumes (records
after the resumed step, from the interrupted run, are dropped first so the curve has no double).
TensorBoard is used when `torch.utils.tensorboard` imports (it needs the tensorboard package).
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
    """Progress bar + metrics file + TensorBoard for one run; use as a context manager."""

    def __init__(self, output_dir: str | Path, total_steps: int, *, start_step: int = 0,
                 console: Console | None = None, show_progress: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        kept = [r for r in read_metrics(self.output_dir) if r.get("step", 0) <= start_step] if start_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.records: list[dict[str, Any]] = kept
        self.tensorboard = _tensorboard(self.output_dir / "tensorboard")
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
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def advance(self, step: int, record: dict[str, Any] | None) -> None:
        """Move the bar to `step`; `record` (when this step is logged) refreshes the numbers shown."""
        stats = None
        if record is not None:
            stats = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                     f"{record['tokens_per_s']:,.0f} tok/s  mem {record['peak_memory_gib']:.2f} GiB")
        self.progress.update(self.task, completed=step, **({"stats": stats} if stats else {}))

    def message(self, text: str) -> None:
        self.progress.console.print(text)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:           # tensorboard is optional
        return None
    return SummaryWriter(str(folder))
