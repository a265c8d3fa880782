"""Bucketed sequence widths: the few padded lengths that CUDA graphs are captured for.

It sits at the bottom of the package because the trainer's padding-free batches (train/data.py,
above data/) and a user's own loop (models/loop_graphs.py, which imports nothing of data/) both pad
to these widths.
"""
from __future__ import annotations


def bucket_width(tokens: int) -> int:
    """The padded width of a padding-free row of `tokens` tokens: a multiple of 256 up to 2,048,
    then of 1/8 of the power of two below (2,304, 2,560, ... 4,096, 4,608, ...). Few enough
    widths that a CUDA graph per width pays off over a run, and no more than 12.5% padding."""
    step = 256 if tokens <= 2048 else 1 << (max(tokens - 1, 1).bit_length() - 4)
    return max(step, -(-tokens // step) * step)
