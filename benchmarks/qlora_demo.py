"""QLoRA vs 16-bit LoRA on the demo: final eval loss of each, and their gap (target: within 2%).

Runs the demo config (src/velotune/configs/demo.yaml: SmolLM2-135M-Instruct, chatterbot corpus,
40 steps) twice, identical except `method` (lora, then qlora: the base loaded with
load_in_4bit=True, its projections in NF4), with no exports and no sample answers, and appends one
row to RESULTS.md under "QLoRA vs LoRA on the demo". On a CPU each run takes a few minutes.

    python benchmarks/qlora_demo.py [--device cpu] [--out /tmp/qlora-demo]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from common import append_row, today
from velotune.cli.train import demo_config_path
from velotune.train.config import load_config
from velotune.train.run import train_from_config


def run(method: str, out: Path, device: str) -> tuple[float, float]:
    """(final eval loss, seconds) of the demo trained with `method`."""
    config = load_config(demo_config_path(), [f"--method={method}", f"--output_dir={out / method}", "--export=[]",
                                              "--sample_prompts=0", "--report=false", f"--device={device}"])
    started = time.perf_counter()
    result = train_from_config(config, console=Console(quiet=True), show_progress=False)
    return result.eval_loss_after, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="where the two runs write (default: a temporary folder)")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="velotune-qlora-demo-"))
    lora, lora_s = run("lora", out, args.device)
    qlora, qlora_s = run("qlora", out, args.device)
    gap = (qlora - lora) / lora
    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else (
        f"CPU ({platform.machine()})")
    row = [today(), f"{device}; torch {torch.__version__}", "demo.yaml (SmolLM2-135M, 40 steps, r16)",
           f"{lora:.4f}", f"{qlora:.4f}", f"{gap:+.2%}", "yes" if abs(gap) <= 0.02 else "no",
           f"{lora_s:.0f} / {qlora_s:.0f}"]
    append_row("QLoRA vs LoRA on the demo",
               ["date", "machine", "config", "LoRA eval loss", "QLoRA eval loss", "QLoRA - LoRA", "within 2%",
                "seconds (LoRA / QLoRA)"], row)
    print(" | ".join(row))


if __name__ == "__main__":
    main()
