"""`profile_steps: [first, last]`: a PyTorch profiler trace of those optimizer steps, and what it says.

The profiler records only the chosen steps (recording costs time and memory, and the first steps
of a run are not typical: kernels compile, CUDA graphs are captured, allocators warm up). Each
profiled step is wrapped in a "velotune step N" annotation, so the trace shows step boundaries.
Written to OUTPUT_DIR/profile/steps_FIRST-LAST.pt.trace.json (one per rank under torchrun): a
Chrome trace that chrome://tracing and ui.perfetto.dev open, named like the traces of torch's
`tensorboard_trace_handler` (`*.pt.trace.json`), which TensorBoard's PyTorch profiler plugin reads.

The printed summary: the operations that took most time (self time on the GPU, or on the CPU when
no GPU ran), and the share of the profiled steps' wall time in which the GPU ran no kernel or copy
(the union of device activity over the steps' span, read back from the trace). A large idle share
means the GPU waits on Python, data or the CPU, and a faster kernel would not help.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PROFILE_DIR = "profile"
STEP_LABEL = "velotune step"
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
TOP_OPERATIONS = 10


class StepProfiler:
    """Starts before step `first`, stops after step `last` (or when the run ends first)."""

    def __init__(self, steps: Sequence[int], output_dir: Path, device: torch.device, *, rank: int | None = None,
                 say: Callable[[str], None] = print) -> None:
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.output_dir, self.device, self.rank, self.say = output_dir, device, rank, say
        self.profiler: profile | None = None
        self.annotation: Any = None
        self.recorded: list[int] = []
        self.ran: list[int] = []              # the first and last step this run ran
        self.trace: Path | None = None

    def before(self, step: int) -> None:
        """Called before optimizer step `step` (1-based) runs."""
        self.ran = [self.ran[0] if self.ran else step, step]
        if not self.first <= step <= self.last:
            return
        if self.profiler is None:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
        self.annotation = record_function(f"{STEP_LABEL} {step}")
        self.annotation.__enter__()
        self.recorded.append(step)

    def after(self, step: int) -> None:
        """Called after step `step` finished (the device synchronised)."""
        if self.annotation is not None:
            self.annotation.__exit__(None, None, None)
            self.annotation = None
        if step >= self.last:
            self.finish()

    def finish(self) -> None:
        """Stop, write the trace, print the summary (also when the run ended before `last`); say so
        when no chosen step ran (a resumed run past them, or a run shorter than `first`)."""
        if self.profiler is None:
            if self.first and not self.recorded and self.ran:
                self.say(f"profile_steps [{self.first}, {self.last}]: this run ran steps {self.ran[0]}-{self.ran[1]}; "
                         "nothing was profiled")
                self.first = 0                 # said once
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.profiler.__exit__(None, None, None)
        profiler, self.profiler = self.profiler, None
        folder = self.output_dir / PROFILE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        rank = f".rank{self.rank}" if self.rank is not None else ""
        self.trace = folder / f"steps_{self.recorded[0]}-{self.recorded[-1]}{rank}.pt.trace.json"
        profiler.export_chrome_trace(str(self.trace))
        for line in summary_lines(profiler, self.trace, self.device, self.recorded):
            self.say(line)


def summary_lines(profiler: profile, trace: Path, device: torch.device, steps: Sequence[int]) -> list[str]:
    events = json.loads(trace.read_text(encoding="utf-8")).get("traceEvents", [])
    span = step_span(events)
    lines = [f"profile of steps {steps[0]}-{steps[-1]}: {trace} (open in ui.perfetto.dev or chrome://tracing)"]
    if span is not None:
        lines.append(f"  {(span[1] - span[0]) / 1000 / len(steps):.1f} ms per step")
    on_device = device.type == "cuda"
    averages = profiler.key_averages()
    timed = [(getattr(a, "self_device_time_total", 0.0) if on_device else a.self_cpu_time_total, a) for a in averages]
    total = sum(t for t, _ in timed) or 1.0
    lines.append(f"  top operations by self {'GPU' if on_device else 'CPU'} time:")
    for spent, average in sorted(timed, key=lambda pair: -pair[0])[:TOP_OPERATIONS]:
        lines.append(f"    {100 * spent / total:5.1f}%  {spent / 1000:9.2f} ms  {average.count:6d} calls  {average.key}")
    if on_device:
        idle = device_idle_share(events, span)
        text = "no step span in the trace" if idle is None else f"{100 * idle:.1f}% of the steps' wall time"
        lines.append(f"  GPU idle (no kernel or copy running): {text}")
    else:
        lines.append("  no GPU in this run: device idle time not measured (CPU operations above)")
    return lines


def step_span(events: Sequence[dict[str, Any]]) -> tuple[float, float] | None:
    """(start, end) in microseconds of the profiled steps' annotations."""
    marks = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events
             if str(e.get("name", "")).startswith(STEP_LABEL) and e.get("ph") == "X" and "ts" in e]
    if not marks:
        return None
    return min(start for start, _ in marks), max(end for _, end in marks)


def device_idle_share(events: Sequence[dict[str, Any]], span: tuple[float, float] | None) -> float | None:
    """1 - (union of device activity intervals within `span`) / span length."""
    if span is None or span[1] <= span[0]:
        return None
    busy_intervals = sorted((max(e["ts"], span[0]), min(e["ts"] + e.get("dur", 0), span[1])) for e in events
                            if e.get("cat") in DEVICE_CATEGORIES and e.get("ph") == "X" and "ts" in e)
    busy, reach = 0.0, span[0]
    for start, end in busy_intervals:
        start = max(start, reach)
        if end > start:
            busy += end - start
            reach = end
    return 1.0 - busy / (span[1] - span[0])
