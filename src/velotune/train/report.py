"""The end-of-run report: OUTPUT_DIR/report.md and OUTPUT_DIR/training.png (loss and learning
rate against the step), drawn from metrics.jsonl so a resumed run's report covers the whole run.

matplotlib is optional (`pip install velotune[report]`) and always used with the Agg backend
(no display needed); without it the report is written without the plot and says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_FILE = "report.md"
PLOT_FILE = "training.png"


@dataclass
class RunSummary:
    model: str
    method: str
    dataset: str
    steps: int
    train_examples: int
    eval_examples: int
    trainable_parameters: int
    total_parameters: int
    train_seconds: float
    tokens_per_s: float
    peak_memory_gib: float
    device: str
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    eval_metrics: dict[str, tuple[float | None, float]] = field(default_factory=dict)   # name -> (before, after)
    saved: dict[str, str] = field(default_factory=dict)         # what -> path
    samples: list[tuple[str, str, str]] = field(default_factory=list)   # prompt, before, after


def plot_training(records: list[dict[str, Any]], path: Path) -> bool:
    """Loss (train, and eval where measured) and learning rate against the step; False without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(output_dir: str | Path, summary: RunSummary, records: list[dict[str, Any]]) -> Path:
    folder = Path(output_dir)
    plotted = plot_training(records, folder / PLOT_FILE)
    s = summary
    lines = [
        f"# velotune run: {s.method} on {s.model}",
        "",
        "| | |", "|---|---|",
        f"| dataset | {s.dataset} ({s.train_examples} train / {s.eval_examples} eval examples) |",
        f"| optimizer steps | {s.steps} |",
        f"| trainable parameters | {s.trainable_parameters:,} of {s.total_parameters:,} "
        f"({100 * s.trainable_parameters / max(1, s.total_parameters):.2f}%) |",
        f"| training time | {s.train_seconds:.1f} s on {s.device} |",
        f"| throughput | {s.tokens_per_s:,.0f} tokens/s |",
        f"| peak memory | {s.peak_memory_gib:.2f} GiB |",
    ]
    if s.eval_loss_before is not None and s.eval_loss_after is not None:
        change = 100 * (s.eval_loss_after - s.eval_loss_before) / s.eval_loss_before
        lines.append(f"| eval loss | {s.eval_loss_before:.4f} -> {s.eval_loss_after:.4f} ({change:+.1f}%) |")
    elif s.eval_loss_after is not None:
        lines.append(f"| eval loss | {s.eval_loss_after:.4f} |")
    for name, (before, after) in s.eval_metrics.items():
        shown = f"{before:.4f} -> {after:.4f}" if before is not None else f"{after:.4f}"
        lines.append(f"| eval {name.replace('_', ' ')} | {shown} |")
    for what, path in s.saved.items():
        lines.append(f"| {what} | `{path}` |")
    lines += ["", f"![loss and learning rate]({PLOT_FILE})" if plotted
              else "(no plot: install matplotlib, `pip install velotune[report]`)"]
    if s.samples:
        lines += ["", "## Held-out prompts", ""]
        for prompt, before, after in s.samples:
            lines += [f"**{prompt}**", "", f"- before: {before}", f"- after: {after}", ""]
    path = folder / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
