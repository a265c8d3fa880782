"""QLoRA vs 16-bit LoRA on the demo: final eval loss of each, and their gap (target: within 2%).

Runs the demo config (src/velotune/configs/demo.yaml: SmolLM2-135M-Instruct, chatterbot corpus,
40 steps) twice, identical except `method` (lora, then qlora: the base loaded with
load_in_4bit=True, its projections in NF4), with no exports and no sample answers, and appends one
row to RESULTS.md under "QLoRA vs LoRA on the demo". On a CPU each run takes a few minutes.
`--keep-16bit-dynamic K` keeps the K projections with the largest activation-weighted NF4 error in
16-bit on the QLoRA side; the row records K and the share of projection weights that stayed 16-bit.
`--lora-init` sets how the QLoRA adapters start: zero (the default, PEFT's start) or quant_error
(as their layer's 4-bit rounding error, train/error_init.py); the config cell names it.

`--seed N` replaces the demo's seed 0 on both sides (it also draws another held-out split): the
gap moves by a few points between seeds, which one row cannot show.

    python benchmarks/qlora_demo.py [--device cpu] [--out /tmp/qlora-demo] [--keep-16bit-dynamic K]
                                    [--lora-init zero|quant_error] [--seed N]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

import velotune
from common import append_row, today
from velotune.cli.train import demo_config_path
from velotune.train.config import LORA_INITS, load_config
from velotune.train.run import train_from_config


def run(method: str, out: Path, device: str, seed: int, keep_dynamic: int = 0,
        lora_init: str = "zero") -> tuple[float, float, float]:
    """(eval loss before, final eval loss, seconds) of the demo trained with `method`."""
    extra = [f"--seed={seed}"]
    extra += [f"--keep_16bit_dynamic={keep_dynamic}"] if keep_dynamic else []
    extra += [f"--lora_init={lora_init}"] if method == "qlora" else []
    config = load_config(demo_config_path(), [f"--method={method}", f"--output_dir={out / method}", "--export=[]",
                                              "--sample_prompts=0", "--report=false", f"--device={device}", *extra])
    started = time.perf_counter()
    result = train_from_config(config, console=Console(quiet=True), show_progress=False)
    return result.eval_loss_before, result.eval_loss_after, time.perf_counter() - started


def kept_share(device: str, keep_dynamic: int) -> tuple[float, list[str]]:
    """(share of projection weights left 16-bit, their names) for the QLoRA base with
    keep_16bit_dynamic=K: one more 4-bit load with the run's settings (training logs only the summary)."""
    device = "cpu" if device == "cpu" or not torch.cuda.is_available() else "cuda"
    model, _ = velotune.load_model(None, device=device, load_in_4bit=True, keep_16bit_dynamic=keep_dynamic)
    report = model.quant_report
    dynamic = [name for name, why in report.kept.items() if why == "dynamic"]
    size = {name: model.get_submodule(name).out_features * model.get_submodule(name).in_features
            for name in [*report.quantized, *dynamic]}
    return sum(size[n] for n in dynamic) / sum(size.values()), dynamic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="where the two runs write (default: a temporary folder)")
    p.add_argument("--keep-16bit-dynamic", type=int, default=0, metavar="K",
                   help="QLoRA side: keep the K projections with the largest NF4 error in 16-bit")
    p.add_argument("--lora-init", choices=LORA_INITS, default="zero",
                   help="QLoRA side: how the adapters start (zero: as PEFT starts them; quant_error: as the "
                        "4-bit rounding error)")
    p.add_argument("--seed", type=int, default=0, help="both runs' seed (the demo's is 0)")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="velotune-qlora-demo-"))
    lora_before, lora, lora_s = run("lora", out, args.device, args.seed)
    qlora_before, qlora, qlora_s = run("qlora", out, args.device, args.seed, args.keep_16bit_dynamic, args.lora_init)
    share, kept = kept_share(args.device, args.keep_16bit_dynamic) if args.keep_16bit_dynamic else (0.0, [])
    gap = (qlora - lora) / lora
    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else (
        f"CPU ({platform.machine()})")
    setup = f"demo.yaml (SmolLM2-135M, 40 steps, r16, seed {args.seed}; QLoRA lora_init {args.lora_init})"
    row = [today(), f"{device}; torch {torch.__version__}", setup,
           f"{args.keep_16bit_dynamic} ({share:.1%} of projection weights)",
           f"{lora_before:.4f} -> {lora:.4f}", f"{qlora_before:.4f} -> {qlora:.4f}", f"{gap:+.2%}",
           "yes" if abs(gap) <= 0.02 else "no", f"{lora_s:.0f} / {qlora_s:.0f}"]
    append_row("QLoRA vs LoRA on the demo",
               ["date", "machine", "config", "QLoRA keep_16bit_dynamic", "LoRA eval loss (before -> after)",
                "QLoRA eval loss (before -> after)", "QLoRA - LoRA", "within 2%", "seconds (LoRA / QLoRA)"], row)
    print(" | ".join(row))
    if kept:
        print("kept 16-bit:", ", ".join(kept))


if __name__ == "__main__":
    main()
