"""Shared pieces of the GPU benchmarks: the machine line, the measured bf16 matmul rate, MFU,
timing, and appending rows to benchmarks/RESULTS.md."""
from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (run it on the device machine)")


def machine() -> str:
    import triton
    import transformers

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return (f"{name}; torch {torch.__version__}; triton {triton.__version__}; "
            f"transformers {transformers.__version__}; CUDA {torch.version.cuda}")


def bf16_matmul_tflops(n: int = 8192, reps: int = 50) -> float:
    """The bf16 matmul rate of this GPU, measured now (MFU's denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def train_flops_per_token(config, seq_len: int) -> float:
    """6 x non-embedding parameters + the attention term (QK^T and PV, forward and backward:
    6 x 2 x layers x seq x heads x head_dim, halved for causal masking)."""
    attn = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6 * config.num_parameters(embeddings=False) + attn


def append_row(section: str, columns: list[str], values: list[str], results: Path | None = None) -> None:
    """Append one row to the table under `## section` in RESULTS.md (or `results`), creating it if needed."""
    path = results or RESULTS
    text = path.read_text() if path.exists() else "# Benchmark results\n\nEvery row names its date and machine.\n"
    heading = f"## {section}"
    row = "| " + " | ".join(values) + " |"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        text += row + "\n"
    else:
        head, _, tail = text.partition(heading)
        # the section's table ends at the first blank line after its header
        table_end = tail.find("\n\n", tail.find("|"))
        if table_end < 0:
            tail = tail.rstrip("\n") + "\n" + row + "\n"
        else:
            tail = tail[:table_end] + "\n" + row + tail[table_end:]
        text = head + heading + tail
    path.write_text(text)


def today() -> str:
    return datetime.date.today().isoformat()
