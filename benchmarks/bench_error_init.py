"""What `lora_init: quant_error` costs at load time: every QLoRA adapter is fitted to its layer's
4-bit rounding error before training starts.

One random bf16 checkpoint of a real architecture (Llama-3.1-8B by default) is saved to
--workdir (16 GB for 8B; kept for the next run), loaded with `load_in_4bit=True`, given r=16
adapters on the seven projections, and then `compensate_quantization_error` runs on 4,096
random calibration tokens in the trainer's shape (CALIBRATION_TOKENS in packed rows of
CALIBRATION_ROW_TOKENS), each packed row holding documents of 256 tokens. The row gives the
4-bit load's seconds beside the fit's, the fit's peak GPU memory above the loaded model, and how
many adapters it set. Random weights make the fit's numbers meaningless but its cost exact.

    python benchmarks/bench_error_init.py [--model Llama-3.1-8B] [--workdir /tmp/w]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench_train import TARGETS, hf_config, save_random_checkpoint
from common import append_row, machine, require_cuda, today

DOCUMENT_TOKENS = 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=None, help="where the random checkpoint is written (and kept)")
    args = p.parse_args()
    require_cuda()
    import velotune
    from velotune.lora import LoraConfig, apply_lora
    from velotune.train.error_init import compensate_quantization_error
    from velotune.train.methods import CALIBRATION_ROW_TOKENS, CALIBRATION_TOKENS

    cfg = hf_config(args.model)
    folder = save_random_checkpoint(cfg, args.workdir or Path(tempfile.mkdtemp(prefix="velotune-errinit-")))
    torch.cuda.synchronize()
    started = time.perf_counter()
    model, _ = velotune.load_model(folder, dtype=torch.bfloat16, device="cuda", load_in_4bit=True)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    apply_lora(model, LoraConfig(r=args.rank, alpha=args.rank, target_modules=TARGETS), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    shape = (CALIBRATION_TOKENS // CALIBRATION_ROW_TOKENS, CALIBRATION_ROW_TOKENS)
    ids = torch.randint(0, cfg["vocab_size"], shape, generator=g)
    positions = torch.arange(CALIBRATION_ROW_TOKENS).remainder(DOCUMENT_TOKENS).expand(shape)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    started = time.perf_counter()
    done = compensate_quantization_error(model, ids.cuda(), positions.cuda())
    torch.cuda.synchronize()
    fit_s = time.perf_counter() - started
    extra_gib = (torch.cuda.max_memory_allocated() - resident) / 2**30
    setup = f"{args.model} QLoRA r{args.rank}, seven projections; {shape[0]} packed rows of {shape[1]}"
    row = [today(), machine(), setup, f"{CALIBRATION_TOKENS:,}", str(len(done)), f"{load_s:.1f}", f"{fit_s:.1f}", f"{fit_s / load_s:.2f}", f"{extra_gib:.2f}"]
    append_row("QLoRA adapter start fitted to the 4-bit error: cost at load",
               ["date", "machine", "config", "calibration tokens", "adapters set", "4-bit load (s)",
                "fit (s)", "fit / load", "fit's peak GPU memory above the model (GiB)"], row)
    print(" | ".join(row))


if __name__ == "__main__":
    main()
