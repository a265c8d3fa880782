"""Stopping a run cleanly on request: SIGTERM (what `velotune studio`'s Stop button, `kill`, a
batch scheduler's time limit and torchrun's shutdown send) ends the run after the optimizer step
in progress, once a checkpoint of that step is written, so `--resume=true` continues exactly.

The handler only sets a flag; the loop looks at it between steps, where the model, optimizer and
data cursor agree. Under torchrun the ranks take the largest flag of all of them (one all-reduce
of one number per step, only when distributed), so every rank stops after the same step and
writes its part of the same checkpoint. A second SIGTERM while the checkpoint is being written
is still only a request: the state being saved is the one worth keeping. SIGKILL is not
catchable and loses the steps since the last checkpoint, as it always did.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

import torch

from velotune import distributed
from velotune.distributed import World
from velotune.train.guard import TrainingStopped

STOPPED_EXIT_CODE = 128 + signal.SIGTERM      # what a shell reports for a process ended by SIGTERM


class StopRequested(TrainingStopped):
    """The run stopped on request after writing a checkpoint; the message says where and how to go on."""


class StopOnSignal:
    """Context manager: while active, SIGTERM sets `requested` instead of ending the process.
    Outside the main thread (signals cannot be caught there) it is inert."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def due(self, world: World, device: torch.device) -> bool:
        """Whether any rank was asked to stop (every rank calls it after each step)."""
        if not world.distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return distributed.global_sum(flag, world).item() > 0
