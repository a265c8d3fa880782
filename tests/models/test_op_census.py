"""The operations one eager LoRA training step dispatches per decoder layer (benchmarks/op_census.py),
pinned: a change that adds kernel launches to a layer's forward, its checkpoint recomputation or
its backward fails here, before a GPU shows the eager step slower.

Why: the eager 8B step at micro-batch 1 is bound by the host queueing its kernels (338 ms on an H100
against 180 ms replayed from a CUDA graph, 2026-12-07), so each launch per layer costs 32 per step.
The numbers are the CPU census's, with the Triton path interpreted (on a GPU the compiled kernels
run; the float32 accumulation of the down adapter's A gradient is then one launch, not three, so
the counts there are lower). Lower them here when a change removes launches."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import op_census  # noqa: E402

# Kernel launches per decoder layer: forward, recompute, backward (127 per layer, 46 of them
# adapter casts and concatenations, before the adapters of a block became one tensor).
MAX_LAUNCHES = {"forward": 30, "recompute": 23, "backward": 42}
# The adapters' share: one concatenation and one cast per block (3 blocks), the gradients' casts.
MAX_ADAPTER_OPS = {"forward": 6, "recompute": 6, "backward": 3}


@pytest.mark.parametrize("autocast", [False, True], ids=["plain-loop", "autocast"])
def test_launches_per_layer_stay_within_the_pinned_counts(device, autocast):
    per_layer, _ = op_census.layer_census(layers=1, seq=16, autocast=autocast, device=device.type)
    launches = {phase: per_layer.total(phase) for phase in op_census.PHASES}
    triton = sum(n for name, n in per_layer.table["forward"]["launches"].items() if name.startswith("triton:"))
    assert triton >= 4, f"the census saw {triton} Triton launches in a layer's forward: is the Triton path counted?"
    for phase, most in MAX_LAUNCHES.items():
        assert launches[phase] <= most, (f"{launches[phase]} kernel launches per decoder layer in the {phase}, "
                                         f"pinned at {most}:\n{op_census.report(per_layer, op_census.Counts())}")
    ops = {phase: per_layer.table[phase]["launches"] for phase in op_census.PHASES}
    adapter_ops = {"forward": ops["forward"]["cat"] + ops["forward"]["_to_copy"],
                   "recompute": ops["recompute"]["cat"] + ops["recompute"]["_to_copy"],
                   # the gradients' casts; on the CPU two more make the float32 A gradient's inputs
                   "backward": ops["backward"]["_to_copy"] - (2 if device.type == "cpu" else 0)}
    assert all(adapter_ops[phase] <= most for phase, most in MAX_ADAPTER_OPS.items()), adapter_ops
