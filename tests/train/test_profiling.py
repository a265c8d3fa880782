"""profile_steps: the trace of the chosen steps, and the GPU's idle share read back from a trace."""
from __future__ import annotations

import json

import pytest
import torch

from velotune.train.profiling import StepProfiler, device_idle_share, step_span


def kernel(ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": "k", "ts": ts, "dur": dur}


def test_idle_share_is_the_span_not_covered_by_device_work():
    events = [{"ph": "X", "cat": "user_annotation", "name": "velotune step 2", "ts": 100, "dur": 100},
              {"ph": "X", "cat": "user_annotation", "name": "velotune step 3", "ts": 200, "dur": 100},
              kernel(90, 20),                        # starts before the span: 10 us inside
              kernel(150, 50), kernel(160, 20),      # the second inside the first: counted once
              kernel(190, 30, "gpu_memcpy"),         # overlaps the first's end by 10 us
              kernel(280, 40, "gpu_memset"),         # runs past the span: 20 us inside
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 100, "dur": 200}]   # not device work
    span = step_span(events)
    assert span == (100, 300)
    busy = 10 + 50 + 20 + 20
    assert device_idle_share(events, span) == pytest.approx(1 - busy / 200)
    assert device_idle_share([], span) == 1.0 and device_idle_share(events, None) is None


def test_only_the_chosen_steps_are_recorded(tmp_path):
    lines: list[str] = []
    profiler = StepProfiler([2, 3], tmp_path, torch.device("cpu"), say=lines.append)
    weight = torch.randn(64, 64, requires_grad=True)
    for step in range(1, 5):
        profiler.before(step)
        (torch.randn(8, 64) @ weight).square().sum().backward()
        profiler.after(step)
    profiler.finish()                         # nothing left to write
    trace = tmp_path / "profile" / "steps_2-3.pt.trace.json"
    names = [e.get("name") for e in json.loads(trace.read_text())["traceEvents"]]
    assert sorted(n for n in names if str(n).startswith("velotune step")) == ["velotune step 2", "velotune step 3"]
    assert names.count("aten::mm") >= 2 and lines[0].startswith(f"profile of steps 2-3: {trace}")
    assert any("aten::" in line for line in lines[2:]) and "device idle time not measured" in lines[-1]


def test_a_run_that_ends_inside_the_range_still_writes_its_trace(tmp_path):
    profiler = StepProfiler([2, 9], tmp_path, torch.device("cpu"), say=lambda line: None)
    for step in (1, 2, 3):
        profiler.before(step)
        torch.ones(4).sum()
        profiler.after(step)
    profiler.finish()
    assert (tmp_path / "profile" / "steps_2-3.pt.trace.json").is_file()


def test_a_run_that_never_reaches_the_steps_says_so(tmp_path):
    lines: list[str] = []
    profiler = StepProfiler([5, 6], tmp_path, torch.device("cpu"), say=lines.append)
    for step in (1, 2, 3):
        profiler.before(step)
        profiler.after(step)
    profiler.finish()
    assert lines == ["profile_steps [5, 6]: this run ran steps 1-3; nothing was profiled"]
    assert not (tmp_path / "profile").exists()
