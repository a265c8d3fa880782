"""Where one velotune training step spends its time: the CPU that launches work and the GPU that
runs it, from torch.profiler, for the same system and loop as bench_train.py.

Why: a step is either launch-bound (the GPU idles while Python and the dispatcher queue kernels)
or kernel-bound (then the top kernels say which to make faster); the two need different fixes.
It prints, for one profiled step after two warm-up steps: wall time, GPU busy time (kernels and
copies), the number of kernel launches, the top kernels by GPU time and the top operators by CPU
time. Nothing is appended to RESULTS.md: this is a diagnostic, not a result.

    python benchmarks/profile_step.py --model Llama-3.1-8B --batch 1 --seq 2048 [--qlora]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train import hf_config, save_random_checkpoint, velotune_system
from common import require_cuda


def main() -> None:
    require_cuda()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--checkpointing", choices=("on", "off", "auto"), default="on")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    cfg = hf_config(args.model)
    folder = None
    if args.qlora:
        import tempfile
        from pathlib import Path

        folder = save_random_checkpoint(cfg, Path(tempfile.mkdtemp(prefix="velotune-prof-")) / args.model)
    model, step, _ = velotune_system(cfg, args.qlora, folder, args.checkpointing, args.offload)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq)).pin_memory()

    def one_step() -> None:
        step(ids)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        one_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    one_step()
    torch.cuda.synchronize()
    unprofiled_ms = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        one_step()
        torch.cuda.synchronize()
        profiled_ms = (time.perf_counter() - start) * 1e3
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in events) / 1e3
    launches = len(events)
    print(f"{args.model} batch {args.batch} seq {args.seq} {'QLoRA' if args.qlora else 'LoRA'} "
          f"ckpt {args.checkpointing}{' + offload' if args.offload else ''}")
    print(f"step {unprofiled_ms:.1f} ms unprofiled, {profiled_ms:.1f} ms profiled; GPU busy {gpu_ms:.1f} ms "
          f"({gpu_ms / unprofiled_ms:.0%} of the unprofiled step); {launches} GPU events")
    table = prof.key_averages()
    print(table.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
