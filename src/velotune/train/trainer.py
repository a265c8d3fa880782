"""The training loop: exact gradient accumulation, schedule, clipping, eval, checkpoints, resume.

Design choices:
- Exact accumulation. An optimizer step takes its k micro-batches up front and counts their
  target tokens (labels after the shift, from the collated labels, before any forward). Each
  micro-batch's backward is on loss_sum / (targets of the whole step), so the summed gradient is
  exactly that of one batch holding all k micro-batches, whatever their lengths or padding.
  Averaging per-micro-batch means instead would weight a short answer's tokens more.
- Right-padded batches need no attention mask: with causal attention no real token sees a pad
  that follows it, and pad labels are ignored, so the model takes its plain causal path.
  Packed rows carry position ids that restart per example, which the model turns into
  document boundaries.
- Precision: on a GPU the math runs under bf16 autocast (fp16 with a gradient scaler where bf16
  is missing, or when asked) while the trainable weights and AdamW state stay float32; on the
  CPU everything is float32.
- With eval examples, eval loss is measured before the first step (a fresh run), every
  `eval_steps`, and after the last step; every number lands in metrics.jsonl.
- Determinism: the data order is a pure function of (seed, epoch) and every RNG (python, numpy,
  torch, CUDA) is saved with the checkpoint, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from velotune.data import Example
from velotune.data.batching import Batch
from velotune.train.checkpoint import (
    TrainState,
    read_contents,
    remove_stale_temporaries,
    write_atomically,
    write_contents,
)
from velotune.train.config import TrainConfig, check_values
from velotune.train.data import MicroBatches, eval_batches
from velotune.train.metrics import RunLog, peak_memory_gib
from velotune.train.optim import build_optimizer
from velotune.train.schedule import build_scheduler, warmup_steps_for


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)       # every optimizer step run by this call
    eval_losses: dict[int, float] = field(default_factory=dict)   # step -> eval loss (0 = before)
    steps: int = 0                                           # optimizer steps done in total
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype of a run (None = no autocast)."""
    if device.type != "cuda" or dtype == "float32":
        return None
    if dtype == "float16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  amp_dtype: torch.dtype | None = None) -> float:
    """Mean token loss of `model` over `examples` (summed over all targets, then divided)."""
    if not examples:
        raise ValueError("no eval examples: set eval_split > 0 or eval_dataset")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, targets = 0.0, 0
    try:
        for batch in eval_batches(examples, batch_size, pad_id):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                            labels=batch["labels"].to(device), return_logits=False)
            loss_sum += float(out.loss_sum)
            targets += int(out.num_targets)
    finally:
        model.train(was_training)
    return loss_sum / targets


class Trainer:
    """Trains the trainable parameters of `model` on `train_examples` as `config` says.

    `save_extra(folder)` (optional) adds files to every checkpoint, e.g. the PEFT adapter."""

    def __init__(self, model: nn.Module, config: TrainConfig, train_examples: Sequence[Example],
                 eval_examples: Sequence[Example] = (), *, pad_id: int = 0, console: Console | None = None,
                 show_progress: bool = True, save_extra: Callable[[Path], None] | None = None) -> None:
        check_values(config, "config")
        self.model, self.config = model, config
        self.device = next(model.parameters()).device
        self.pad_id = pad_id
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        self.save_extra = save_extra
        self.output_dir = Path(config.output_dir)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.eval_examples = list(eval_examples)
        self.batches = MicroBatches(train_examples, config.micro_batch_size, pad_id=pad_id, seed=config.seed,
                                    packing=config.packing, max_seq_length=config.max_seq_length)
        self.total_steps = config.max_steps or math.ceil(
            config.num_epochs * len(self.batches) / config.gradient_accumulation_steps)
        self.optimizer = build_optimizer(model, config)
        warmup = warmup_steps_for(config.warmup_steps, config.warmup_ratio, self.total_steps)
        self.scheduler = build_scheduler(self.optimizer, config.lr_scheduler, warmup, self.total_steps)
        self.amp_dtype = autocast_dtype(self.device, config.dtype)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.state = TrainState()
        model.gradient_checkpointing = config.gradient_checkpointing

    # --- one step ---------------------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def forward_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, target count) of one collated batch."""
        ids = batch["input_ids"].to(self.device)                      # type: ignore[union-attr]
        labels = batch["labels"].to(self.device)                      # type: ignore[union-attr]
        positions = batch["position_ids"].to(self.device)             # type: ignore[union-attr]
        with self.autocast():
            out = self.model(ids, position_ids=positions, labels=labels, return_logits=False)
        return out.loss_sum.float(), out.num_targets

    def accumulate(self, micro_batches: Sequence[Batch]) -> tuple[float, int]:
        """Backward over the micro-batches of one optimizer step, normalised by the step's total
        target count; returns (loss of the step, its target tokens). Gradients are added to .grad."""
        total = sum(int(b["num_target_tokens"]) for b in micro_batches)   # type: ignore[arg-type]
        if total == 0:
            raise ValueError("an optimizer step has no target tokens (every label is -100)")
        loss_sum = 0.0
        for batch in micro_batches:
            summed, _ = self.forward_sum(batch)
            scaled = summed / total
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += float(summed.detach())
        return loss_sum / total, total

    def optimizer_step(self, micro_batches: Sequence[Batch]) -> tuple[float, float, float]:
        """One full step: accumulate, clip, update, schedule. Returns (loss, grad norm, lr used)."""
        lr = self.scheduler.get_last_lr()[0]
        loss, _ = self.accumulate(micro_batches)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, lr

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, examples: Sequence[Example] | None = None) -> float:
        """Mean token loss over `examples` (default: the eval split)."""
        examples = self.eval_examples if examples is None else examples
        return evaluate_loss(self.model, examples, self.config.micro_batch_size, self.pad_id, self.amp_dtype)

    def _evaluate_into(self, result: TrainResult, log: RunLog) -> None:
        result.eval_losses[self.state.step] = loss = self.evaluate()
        log.write({"step": self.state.step, "eval_loss": loss})
        log.message(f"step {self.state.step}: eval loss {loss:.4f}")

    # --- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        def write(folder: Path) -> None:
            write_contents(folder, self.model, self.optimizer, self.scheduler, self.state, self.save_extra)
        return write_atomically(self.output_dir, self.state.step, write, keep=self.config.save_total_limit)

    def resume_from(self, folder: Path) -> None:
        self.state = read_contents(folder, self.model, self.optimizer, self.scheduler)
        if self.state.step > self.total_steps:
            raise ValueError(f"{folder}: checkpoint is at step {self.state.step}, past this run's "
                             f"{self.total_steps} steps")

    # --- the loop -----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg, state = self.config, self.state
        remove_stale_temporaries(self.output_dir)
        result = TrainResult(steps=state.step)
        stream = self.batches.iterate(state.epoch, state.batch_index)
        window = {"loss_sum": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0}
        all_tokens, all_seconds = 0, 0.0
        self.model.train()
        with RunLog(self.output_dir, self.total_steps, start_step=state.step, console=self.console,
                    show_progress=self.show_progress) as log:
            if self.eval_examples and state.step == 0:
                self._evaluate_into(result, log)
            while state.step < self.total_steps:
                started = time.perf_counter()
                drawn = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
                micro = [batch for _, _, batch in drawn]
                loss, grad_norm, lr = self.optimizer_step(micro)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - started
                tokens = sum(int(b["num_tokens"]) for b in micro)       # type: ignore[arg-type]
                targets = sum(int(b["num_target_tokens"]) for b in micro)  # type: ignore[arg-type]
                epoch, index, _ = drawn[-1]
                state.epoch, state.batch_index = (epoch, index + 1) if index + 1 < len(self.batches) else (epoch + 1, 0)
                state.step += 1
                state.tokens_seen += tokens
                state.target_tokens_seen += targets
                state.elapsed_s += seconds
                result.losses.append(loss)
                all_tokens, all_seconds = all_tokens + tokens, all_seconds + seconds
                for key, value in (("loss_sum", loss * targets), ("targets", targets), ("tokens", tokens),
                                   ("seconds", seconds)):
                    window[key] += value
                record = None
                if state.step % cfg.logging_steps == 0 or state.step == self.total_steps:
                    record = {"step": state.step, "loss": window["loss_sum"] / window["targets"], "lr": lr,
                              "grad_norm": grad_norm, "tokens_per_s": window["tokens"] / window["seconds"],
                              "peak_memory_gib": peak_memory_gib(self.device), "epoch": state.epoch,
                              "tokens_seen": state.tokens_seen}
                    log.write(record)
                    window = dict.fromkeys(window, 0.0)
                log.advance(state.step, record)
                if cfg.eval_steps and self.eval_examples and state.step % cfg.eval_steps == 0:
                    self._evaluate_into(result, log)
                if cfg.save_steps and state.step % cfg.save_steps == 0:
                    self.save_checkpoint()
            if self.eval_examples and state.step not in result.eval_losses:
                self._evaluate_into(result, log)
        result.steps = state.step
        result.train_seconds = all_seconds
        result.tokens_per_s = all_tokens / all_seconds if all_seconds else 0.0
        return result
