"""Learning-rate schedules: linear warm-up from 0, then linear decay to 0, cosine decay to 0, or
constant. A pure function of the step, wrapped in `LambdaLR`, so the scheduler's state is just
its step count and resumes exactly.

Warm-up runs (s + 1) / (w + 1) for steps s < w, and decay is measured over the steps after
warm-up, so no optimizer step ever runs at a learning rate of exactly zero (neither the first nor
the last): every step the user pays for moves the weights."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `step` (0-based: the step about to run)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(progress, 1.0)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown lr_scheduler {kind!r}")
    return factor


def warmup_steps_for(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_factor(kind, warmup_steps, total_steps))
