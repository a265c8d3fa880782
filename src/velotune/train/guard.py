"""The training loop's guard: a step whose numbers are not finite never reaches the weights, and
a loss that runs away is reported while there is still time to stop.

`learning_rate: .inf` used to train and save an adapter full of NaN with exit status 0, and
`2e4` (a typo for 2e-4) took the eval loss from 2.00 to 10.80 without a word. The guard sits
between the gradient clipping and the optimizer update (`Trainer.optimizer_step` asks
`LoopGuard.admit`), where the step's learning rate, loss and gradient norm are already host
numbers: the loop reads the loss and the norm once per optimizer step anyway, so the guard adds no
GPU->host synchronisation, per micro-batch or otherwise. It sees only those three numbers and the
micro-batches' `where` lists (the rows' provenance, "train.jsonl line 17", set by
`MicroBatches.collate`), so it serves every method that goes through the Trainer.

A non-finite learning rate, loss or gradient norm (the norm is not judged under float16 loss
scaling, whose scaler skips overflowing steps by itself):
- `on_nonfinite: stop` (default): the update is not applied, the state before it (the last good
  one) is written as a checkpoint (or the existing checkpoint of that step is named), and the run
  stops with a `NonFiniteStep` naming the step, the three numbers, the step's rows and, found by
  one extra forward per row (only now, after the failure; one process only, since the ranks'
  row counts need not agree), the rows whose own loss is not finite.
- `on_nonfinite: skip`: the gradients are dropped, the schedule moves on, and a line says so;
  `MAX_SKIPPED_IN_A_ROW` skips in a row stop the run as above (the model itself is then broken).

Divergence (`divergence_ratio`, default 2, 0 = off): the training loss is smoothed (an
exponential average, weight 0.1 per step, so one noisy micro-batch does not trip it) and a line is
printed once when it passes ratio x its lowest value so far; likewise once when an eval loss passes
ratio x the best eval loss. Both are warnings: a rising loss can be a choice (a new data mix), a
NaN never is.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from velotune.data.batching import Batch
from velotune.train.checkpoint import latest_checkpoint

if TYPE_CHECKING:
    from velotune.train.trainer import Trainer

MAX_SKIPPED_IN_A_ROW = 5
SMOOTHING = 0.1
SHOWN_ROWS = 8


class TrainingStopped(RuntimeError):
    """The run stopped itself for a reason the message explains (a one-line error for the CLI)."""


class NonFiniteStep(TrainingStopped):
    """A step whose learning rate, loss or gradient norm is not finite."""


class LoopGuard:
    """Judges every optimizer step (`admit`) and eval loss (`observe_eval`); `say` prints a
    line of plain text (None on ranks other than 0). `warnings` keeps every divergence report."""

    def __init__(self, on_nonfinite: str = "stop", divergence_ratio: float = 2.0, *,
                 say: Callable[[str], Any] | None = None, loss_scaled: bool = False) -> None:
        self.on_nonfinite = on_nonfinite
        self.ratio = divergence_ratio
        self.say = say or (lambda text: None)
        self.loss_scaled = loss_scaled
        self.skipped_in_a_row = 0
        self.smoothed: float | None = None
        self.lowest = math.inf
        self.best_eval = math.inf
        self.warned = self.eval_warned = False
        self.warnings: list[str] = []

    def admit(self, trainer: Trainer, micro_batches: Sequence[Batch], loss: float, grad_norm: float,
              lr: float) -> bool:
        """True when the step's update may be applied. False after dropping the gradients of a
        skipped step; raises NonFiniteStep to stop."""
        step = trainer.state.step + 1
        bad = nonfinite(lr, loss, None if self.loss_scaled else grad_norm)
        if not bad:
            self.skipped_in_a_row = 0
            self._watch(step, loss, lr)
            return True
        trainer.optimizer.zero_grad(set_to_none=True)
        numbers = f"loss {loss:.6g}, grad norm {grad_norm:.6g}, lr {lr:.6g}"
        if self.on_nonfinite == "skip" and self.skipped_in_a_row + 1 < MAX_SKIPPED_IN_A_ROW:
            self.skipped_in_a_row += 1
            with warnings.catch_warnings():      # torch warns of a schedule stepped before any update
                warnings.simplefilter("ignore", UserWarning)
                trainer.scheduler.step()
            if trainer.scaler is not None:
                trainer.scaler.update()
            self.say(f"step {step}: non-finite {bad} ({numbers}); update skipped (on_nonfinite: skip); "
                     f"rows: {shown(rows_of(micro_batches))}")
            return False
        in_a_row = f" ({MAX_SKIPPED_IN_A_ROW} steps in a row)" if self.on_nonfinite == "skip" else ""
        raise NonFiniteStep(stop_message(trainer, micro_batches, step, f"non-finite {bad}{in_a_row} ({numbers})"))

    def _watch(self, step: int, loss: float, lr: float) -> None:
        self.smoothed = loss if self.smoothed is None else (1 - SMOOTHING) * self.smoothed + SMOOTHING * loss
        self.lowest = min(self.lowest, self.smoothed)
        if self.ratio and not self.warned and self.smoothed > self.ratio * self.lowest > 0:
            self.warned = True
            self._warn(f"step {step}: the training loss is diverging: {self.smoothed:.4f} (smoothed) is "
                       f"{self.smoothed / self.lowest:.1f}x its lowest, {self.lowest:.4f}; key 'learning_rate' "
                       f"({lr:g} now) may be too high")

    def observe_eval(self, step: int, loss: float) -> None:
        """An eval loss; warns once when it passes ratio x the best one (non-finite included)."""
        if self.eval_warned:
            return
        if not math.isfinite(loss):
            self.eval_warned = True
            self._warn(f"step {step}: eval loss is {loss}: the weights are no longer finite")
        elif self.ratio and loss > self.ratio * self.best_eval:
            self.eval_warned = True
            self._warn(f"step {step}: eval loss {loss:.4f} is {loss / self.best_eval:.1f}x its best, "
                       f"{self.best_eval:.4f}: the run is diverging (key 'learning_rate' too high?) or overfitting")
        self.best_eval = min(self.best_eval, loss)

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        self.say(f"warning: {text}")


def nonfinite(lr: float, loss: float, grad_norm: float | None) -> str:
    """Which of the numbers are not finite ("" when all are)."""
    names = [name for name, value in (("learning rate", lr), ("loss", loss), ("gradient norm", grad_norm))
             if value is not None and not math.isfinite(value)]
    return " and ".join(names)


def rows_of(micro_batches: Sequence[Batch]) -> list[str]:
    """The provenance of every row of the micro-batches (this rank's), in order."""
    rows: list[str] = []
    for batch in micro_batches:
        rows += list(batch.get("where") or ["(rows without provenance)"])   # type: ignore[arg-type]
    return rows


def shown(rows: Sequence[str]) -> str:
    text = ", ".join(rows[:SHOWN_ROWS])
    return text + (f", ... ({len(rows)} rows)" if len(rows) > SHOWN_ROWS else "")


@torch.no_grad()
def rows_with_nonfinite_loss(trainer: Trainer, micro_batches: Sequence[Batch]) -> list[str] | None:
    """The rows whose own loss is not finite, each run alone through the model (None where this
    cannot be told: many ranks, or batches without token rows)."""
    if trainer.world.distributed:
        return None
    found = []
    for batch in micro_batches:
        where, ids = batch.get("where"), batch.get("input_ids")
        if not isinstance(where, list) or not isinstance(ids, torch.Tensor):
            return None
        for i, name in enumerate(where):
            loss_sum, _ = trainer.forward_sum(row_of(batch, i))
            if not torch.isfinite(loss_sum).item():
                found.append(name)
    return found


def row_of(batch: Batch, i: int) -> Batch:
    """Row i of a batch as a batch of its own: a padded or packed batch's i-th row, or a
    padding-free batch's i-th document (its `where` names one document each)."""
    keys = ("input_ids", "labels", "position_ids")
    if batch.get("cu_seqlens") is None:
        return {key: batch[key][i:i + 1] for key in keys}                              # type: ignore[index]
    start, end = batch["cu_seqlens"][i:i + 2].tolist()                                   # type: ignore[index]
    return {key: batch[key][:, start:end] for key in keys}                               # type: ignore[index]


def stop_message(trainer: Trainer, micro_batches: Sequence[Batch], step: int, what: str) -> str:
    """Keep the state before the step as a checkpoint; the one-line reason to stop."""
    rows = rows_of(micro_batches)
    culprits = rows_with_nonfinite_loss(trainer, micro_batches)
    text = f"step {step}: {what}; the update was not applied. The step's rows: {shown(rows)}"
    if culprits:
        text += f"; rows whose own loss is not finite: {shown(culprits)}"
    elif culprits is not None:
        text += "; each row alone gives a finite loss (the weights or the learning rate are at fault)"
    if trainer.state.step == 0:
        return text + ". Nothing was trained yet; no checkpoint was written"
    latest = latest_checkpoint(trainer.output_dir)
    kept = latest if latest is not None and latest.name == f"step-{trainer.state.step}" else trainer.save_checkpoint()
    return (text + f". The last good state (step {trainer.state.step}) is in {kept}: fix the rows or lower "
            f"key 'learning_rate', then resume with --resume={kept} (or set on_nonfinite: skip)")
