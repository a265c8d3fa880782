"""Where one velotune training step spends its time: the CPU that launches work and the GPU that
runs it, from torch.profiler, for the same system and loop as bench_train.py.

Why: a step is either launch-bound (the GPU idles while Python and the dispatcher queue kernels)
or kernel-bound (then the top kernels say which to make faster); the two need different fixes.
It prints, for the profiled steps (one unless `--profiled-steps`) after the warm-up steps: wall
time, GPU busy time (kernels and copies) and the number of kernel launches per step, and the top
kernels by GPU time and operators by CPU time (summed over the profiled steps). `--shapes` groups operators by their input shapes (which matmul is slow, not only that
matmuls are); `--memory` (with `--eager`) prints the allocated memory after, and the peak during, the
forward, the backward and the optimizer step (where a memory target is missed).
Nothing is appended to RESULTS.md: this is a diagnostic, not a result.

    python benchmarks/profile_step.py --model Llama-3.1-8B --batch 1 --seq 2048 [--qlora] [--eager]
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
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (the profiler then sees every kernel)")
    p.add_argument("--shapes", action="store_true", help="also group operators by input shapes")
    p.add_argument("--memory", action="store_true", help="peak memory of each phase of an eager step")
    p.add_argument("--sites", action="store_true",
                   help="what is allocated at the step's peak, grouped by the velotune line that allocated it")
    p.add_argument("--steps", type=int, default=3, help="unprofiled steps averaged for the wall time")
    p.add_argument("--trace", help="write the profiled steps' Chrome trace to this file")
    p.add_argument("--cprofile", help="also run one step under cProfile and write its pstats to this file "
                                      "(where the host's Python time goes in a launch-bound step)")
    p.add_argument("--profiled-steps", type=int, default=1,
                   help="steps profiled back to back (more than one shows what lies between steps: "
                        "idle GPU time, or slower replays once the GPU runs at its power limit)")
    args = p.parse_args()
    if (args.memory or args.sites) and not args.eager:
        p.error("--memory and --sites look inside an eager step: add --eager")
    cfg = hf_config(args.model)
    folder = None
    if args.qlora:
        import tempfile
        from pathlib import Path

        folder = save_random_checkpoint(cfg, Path(tempfile.mkdtemp(prefix="velotune-prof-")) / args.model)
    model, step, _ = velotune_system(cfg, args.qlora, folder, args.checkpointing, args.offload,
                                     graphs=not args.eager)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq)).pin_memory()

    def one_step() -> None:
        step(ids)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):   # as bench_train: compile, autotune, and (with graphs) time eager, capture
        one_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):   # back to back, as the benchmark's loop runs them
        one_step()
    torch.cuda.synchronize()
    unprofiled_ms = (time.perf_counter() - start) * 1e3 / args.steps
    embed = model.model.embed_tokens
    if not isinstance(embed, torch.nn.Embedding):   # host table: the CPU's share of each step
        start = time.perf_counter()
        embed(ids)
        print(f"host embedding lookup of {ids.numel()} ids: {(time.perf_counter() - start) * 1e3:.1f} ms on the CPU")
    if args.memory:
        memory_phases(model, ids, opt)
    if args.sites:
        memory_sites(one_step, model, opt, args.rows)
    if args.cprofile:
        python_profile(one_step, args.cprofile)
    n = args.profiled_steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=args.shapes) as prof:
        start = time.perf_counter()
        for _ in range(n):
            one_step()
        torch.cuda.synchronize()
        profiled_ms = (time.perf_counter() - start) * 1e3 / n
    if args.trace:
        prof.export_chrome_trace(args.trace)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in events) / 1e3 / n
    launches = len(events) // n
    print(f"{args.model} batch {args.batch} seq {args.seq} {'QLoRA' if args.qlora else 'LoRA'} "
          f"ckpt {args.checkpointing}{' + offload' if args.offload else ''}")
    print(f"step {unprofiled_ms:.1f} ms unprofiled (mean of {args.steps}), {profiled_ms:.1f} ms profiled (mean of {n}); GPU busy {gpu_ms:.1f} ms "
          f"({gpu_ms / unprofiled_ms:.0%} of the unprofiled step); {launches} GPU events")
    table = prof.key_averages()
    print(table.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    if args.shapes:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="device_time_total", row_limit=args.rows * 2, max_name_column_width=30,
                             max_shapes_column_width=70))


def python_profile(one_step, path: str) -> None:
    """One step under cProfile, its stats written to `path` and the top functions by own time
    printed: the host's Python work per step, which torch.profiler's operator table leaves out."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    one_step()
    torch.cuda.synchronize()
    profiler.disable()
    profiler.dump_stats(path)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def memory_phases(model: torch.nn.Module, ids: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    """Allocated GiB before the step and the peak of each phase (forward with the loss, backward,
    optimizer step): which phase sets the step's peak, and by how much over what stays allocated."""
    gib = 2 ** 30
    torch.cuda.synchronize()
    rows = [("before the step", torch.cuda.memory_allocated(), None)]

    def measured(name: str) -> None:
        torch.cuda.synchronize()
        rows.append((name, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
        torch.cuda.reset_peak_memory_stats()

    torch.cuda.reset_peak_memory_stats()
    device_ids = ids.to("cuda", non_blocking=True)
    out = model(device_ids, labels=device_ids, return_logits=False)
    measured("forward + loss")
    (out.loss_sum / out.num_targets).backward()
    del out
    measured("backward")
    opt.step()
    measured("optimizer step")
    opt.zero_grad(set_to_none=True)
    for name, after, peak in rows:
        print(f"memory: {name:16s} allocated after {after / gib:7.3f} GiB"
              + ("" if peak is None else f", peak {peak / gib:7.3f} GiB"))


def memory_sites(one_step, model: torch.nn.Module, opt: torch.optim.Optimizer, rows: int) -> None:
    """The live allocations at the peak of one step, by the velotune line that made them
    (benchmarks/memory_sites.py); what was allocated before the step is split into the parts we
    can name (weights, adapters, optimizer state)."""
    from memory_sites import print_sites, recorded_trace

    gib = 2 ** 30
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_cuda)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.is_cuda)
    print(f"sites: before the step {before / gib:.3f} GiB = parameters {params / gib:.3f} + optimizer state "
          f"{state / gib:.3f} + other {(before - params - state) / gib:.3f}")
    with recorded_trace() as trace:
        one_step()
    print_sites(trace, before, rows)

if __name__ == "__main__":
    main()
