"""Why the first step at each new micro-batch width is slow when checkpoints are offloaded: each
width's three first calls (eager warm-up, capture + first replay, replay) timed one by one, with
and without offloaded checkpoints, and the host operators of one warm-up profiled.

Why: in `velotune train` runs of rows of varying length (bench_e2e.py, 12 bucketed widths) the
first step at a new width took 1.5-5x longer with `offload_checkpoints` on than off, which cost the
offloaded default a third of its speed on a 300-row epoch. This separates the warm-up, the capture
and the replays, and says where the host time goes. A diagnostic: nothing goes to RESULTS.md.

    python benchmarks/offload_widths.py --model Llama-3.1-8B --batch 4 [--offload] [--profile-width 1024]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train import hf_config, velotune_system
from common import require_cuda


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def describe(model) -> str:
    """Where the last forward put its checkpoints and what its offloader pinned."""
    placement, stats = getattr(model, "placement", None), getattr(model, "offload_stats", None)
    if placement is None:
        return "no placement"
    text = (f"{placement.offloaded} layers to host in pieces {sorted(set(placement.pieces))}, "
            f"{sum(placement.kept)} kept attention outputs, host {placement.host_bytes / 2**30:.2f} GiB")
    if stats is not None and placement.offloaded:
        text += (f"; offloaded {stats.offloaded}, pooled {stats.reused}, pinned {stats.allocated} "
                 f"({stats.allocated_bytes / 2**30:.2f} GiB in {stats.allocation_seconds * 1e3:.0f} ms)")
    return text


def main() -> None:
    require_cuda()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 768, 2048, 1536, 256])
    p.add_argument("--offload", action="store_true")
    p.add_argument("--profile-width", type=int, default=0, help="profile the warm-up of this width")
    args = p.parse_args()
    from velotune.train.graphed_step import GraphedMicroStep

    model, _, config = velotune_system(hf_config(args.model), False, offload=args.offload, graphs=False)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    graphed = GraphedMicroStep(model, params, max_shapes=len(args.widths),
                               max_tokens=args.batch * max(args.widths))
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    gen = torch.Generator().manual_seed(0)
    print(f"{args.model} batch {args.batch} offload {args.offload}")
    for width in args.widths:
        ids = torch.randint(0, config.vocab_size, (args.batch, width), generator=gen)
        scale = 1.0 / (args.batch * (width - 1))

        def call() -> None:
            graphed(ids, ids, None, scale)
            opt.step()
            opt.zero_grad(set_to_none=True)

        times, moved = [], []
        for i in range(3):
            if i == 0 and width == args.profile_width:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    times.append(timed(call))
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
            else:
                times.append(timed(call))
            if i < 2:   # the warm-up's and the capture's forward (replays run no Python)
                moved.append(describe(model))
        pool = getattr(model, "offload_pool", None)
        held = f"; host buffers {len(pool.buffers)}, {pool.held_bytes / 2**30:.2f} GiB" if pool is not None else ""
        print(f"width {width}: warm-up {times[0]:.0f} ms, capture+replay {times[1]:.0f} ms, "
              f"replay {times[2]:.0f} ms; allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, "
              f"reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB{held}\n  warm-up: {moved[0]}\n"
              f"  capture: {moved[1]}", flush=True)
    print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
