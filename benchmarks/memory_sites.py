"""What is allocated on the GPU at the peak, and which velotune line allocated it.

Why: a peak-memory figure above a rival's says nothing about where the bytes are. The CUDA
caching allocator can record every allocation with its Python stack
(`torch.cuda.memory._record_memory_history`); replaying that trace (an alloc adds its size, a
free_requested removes it, which is when `memory_allocated` drops) finds the peak and the blocks
live at that moment. They are grouped by the innermost velotune source line, with one example
chain of velotune frames per group (which phase: loading, evaluation, a captured step...).

    python benchmarks/memory_sites.py [--rows N] -- train ARGS...   # a whole `velotune train` run,
                                                                    # recorded from before the model loads
profile_step.py --eager --sites uses the same replay for one step of its plain loop.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

GIB = 2 ** 30


@contextmanager
def recorded_trace(max_entries: int = 8_000_000) -> Iterator[list[dict]]:
    """Records the allocator's events while the block runs; the list is filled on exit."""
    trace: list[dict] = []
    torch.cuda.memory._record_memory_history(max_entries=max_entries, context="alloc", stacks="python")
    try:
        yield trace
    finally:
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        trace.extend(snapshot["device_traces"][torch.cuda.current_device()])


def _ours(frames: list[dict]) -> list[dict]:
    return [f for f in frames if "velotune" in f["filename"] or "benchmarks" in f["filename"]]


def _where(frame: dict) -> str:
    return f"{frame['filename'].split('/src/')[-1].split('/benchmarks/')[-1]}:{frame['line']}"


def print_sites(trace: list[dict], before: int, rows: int) -> None:
    """Prints the peak (`before` = bytes allocated when the recording began) and its top sites."""
    total = peak = before
    peak_at = -1
    for i, event in enumerate(trace):
        total += {"alloc": event["size"], "free_requested": -event["size"]}.get(event["action"], 0)
        if total > peak:
            peak, peak_at = total, i
    live: dict[int, dict] = {}
    for event in trace[:peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
    sizes: dict[str, int] = {}
    chains: dict[str, str] = {}
    for event in live.values():
        frames = _ours(event.get("frames", []))
        key = f"{_where(frames[0])} {frames[0]['name']}" if frames else "(no velotune frame)"
        sizes[key] = sizes.get(key, 0) + event["size"]
        callers = frames[1:5] + (frames[-5:] if len(frames) > 9 else frames[5:])
        chains.setdefault(key, " < ".join(_where(f) for f in callers))
    print(f"sites: peak {peak / GIB:.3f} GiB, {(peak - before) / GIB:.3f} GiB above the recording's start, "
          f"at event {peak_at} of {len(trace)}")
    for key, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"sites: {size / GIB:8.3f} GiB  {key}" + (f"\nsites:            via {chains[key]}" if chains[key] else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then velotune's arguments (e.g. train ...)")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    from velotune.cli import main as velotune_main

    torch.cuda.init()
    with recorded_trace() as trace:
        code = velotune_main(command)
    print_sites(trace, 0, args.rows)
    sys.exit(code)


if __name__ == "__main__":
    main()
