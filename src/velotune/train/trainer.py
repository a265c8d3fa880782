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
- Many ranks (torchrun): the model is wrapped with DDP (adapters) or FSDP2 (full weights), each
  rank trains its share of every global micro-batch (`RankMicroBatches`), and the step's target
  count is summed over ranks before any forward, so N ranks x micro-batch b give the losses and
  gradients of one process x micro-batch N*b. DDP reduces gradients only on the last
  accumulation micro-batch (`no_sync` before). Only rank 0 logs, shows progress and writes
  files, except FSDP checkpoints, of which every rank writes its shards.
- Failures explain themselves: `LoopGuard` (train/guard.py) judges each step's learning rate,
  loss and gradient norm before the update (stop or skip on a non-finite one, naming the rows;
  warn on a diverging loss), and an out-of-memory in `train` becomes a `TrainingOutOfMemory`
  with the estimator's breakdown and the changes that fit (train/oom.py).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from velotune import distributed
from velotune.data import Example
from velotune.data.batching import Batch
from velotune.distributed import World
from velotune.models.checkpointing import configure_training_memory
from velotune.models.host_embedding import EmbeddingOffloadError, stage_host_ids
from velotune.models.masks import DocumentSpans
from velotune.train.checkpoint import (
    CheckpointError,
    TrainState,
    read_contents,
    remove_stale_temporaries,
    write_atomically,
    write_contents,
    write_sharded,
)
from velotune.train.config import TrainConfig, TrainConfigError, check_values
from velotune.train.graphed_step import GraphedMicroStep, graph_blockers
from velotune.train.guard import LoopGuard
from velotune.train.metrics import RunLog, peak_memory_gib
from velotune.train.oom import explain_out_of_memory
from velotune.train.optim import build_optimizer
from velotune.train.rank_batches import RankMicroBatches
from velotune.train.schedule import build_scheduler, warmup_steps_for


# Bucketed padding-free widths up to 8 x 2,048 tokens number 24 (data/batching.py:bucket_width);
# graphs share one GPU memory pool and one set of offload host buffers, so more shapes cost
# capture time, not memory.
MAX_GRAPHED_SHAPES = 64


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


@dataclass
class StepOutcome:
    loss: float            # mean token loss of the step over every rank
    grad_norm: float
    lr: float              # the learning rate the step used
    targets: int           # target tokens of the step, all ranks
    tokens: int            # real (non-padding) input tokens of the step, all ranks


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  amp_dtype: torch.dtype | None = None, *, world: World = World(),
                  device: torch.device | None = None, flat: bool = False) -> float:
    """Mean token loss of `model` over `examples` (summed over all targets, then divided). With
    many ranks each evaluates its share and the sums are added over ranks (every rank calls it).
    `flat`: padding-free batches (as the trainer trains on a GPU)."""
    if not examples:
        raise ValueError("no eval examples: set eval_split > 0 or eval_dataset")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)     # loss sum, target count
    try:
        for batch in distributed.rank_eval_batches(examples, batch_size, pad_id, world, flat=flat):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                            labels=batch["labels"].to(device), return_logits=False,
                            documents=batch_documents(batch, device))
            sums[0] += out.loss_sum.double()
            sums[1] += out.num_targets
    finally:
        model.train(was_training)
    loss_sum, targets = distributed.global_sum(sums, world).tolist()
    return loss_sum / targets


def batch_documents(batch: Batch, device: torch.device) -> DocumentSpans | None:
    """A padding-free batch's document spans on `device` (None for padded or packed batches)."""
    if batch.get("cu_seqlens") is None:
        return None
    return DocumentSpans(batch["cu_seqlens"].to(device, non_blocking=True),   # type: ignore[union-attr]
                         int(batch["max_document_length"]))                      # type: ignore[arg-type]


def padding_free(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether micro-batches are laid end to end (data/batching.py:collate_flat): on a GPU in half
    precision, where attention over packed documents is flash's variable-length kernel, for a
    dense model whose attention takes it (`ModelConfig.varlen_attention`: soft-capped or sink
    attention runs explicitly over a whole-row mask, where a long flat row costs more than
    padding). Mixture-of-experts models keep padded rows: their load-balancing loss is per row."""
    config = getattr(model, "config", None)
    return (device.type == "cuda" and amp_dtype in (torch.bfloat16, torch.float16) and config is not None
            and getattr(config, "varlen_attention", False) and not getattr(config, "num_experts", 0))


class _QuietLog:
    """The run log of ranks other than 0: they show and write nothing."""

    def __enter__(self) -> _QuietLog:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, record: dict[str, Any]) -> None:
        return None

    def advance(self, step: int, record: dict[str, Any] | None) -> None:
        return None

    def message(self, text: str) -> None:
        return None


class Trainer:
    """Trains the trainable parameters of `model` on `train_examples` as `config` says.

    `save_extra(folder)` (optional) adds files to every checkpoint, e.g. the PEFT adapter.
    `world` defaults to the joined process group (one process without one); `device` to the
    model's (pass it when FSDP should move a CPU-loaded model to the GPU while sharding).
    `self.model` stays the plain module (for eval and saving); `self.wrapped` is what trains."""

    def __init__(self, model: nn.Module, config: TrainConfig, train_examples: Sequence[Example],
                 eval_examples: Sequence[Example] = (), *, pad_id: int = 0, console: Console | None = None,
                 show_progress: bool = True, save_extra: Callable[[Path], None] | None = None,
                 world: World | None = None, device: torch.device | None = None) -> None:
        check_values(config, "config")
        self.model, self.config = model, config
        self.world = world or distributed.current()
        self.device = device or next(model.parameters()).device
        self.strategy = distributed.resolve_strategy(config.distributed, config.uses_lora, self.world)
        if self.strategy == "fsdp" and config.optimizer == "galore":
            raise TrainConfigError("key 'optimizer': galore needs whole weight matrices; it cannot run on FSDP "
                                   "shards (use adamw, or distributed: ddp)")
        self.amp_dtype = autocast_dtype(self.device, config.dtype)
        embeddings_note = self._offload_embeddings(model)   # before wrapping: DDP must ignore the host table
        self.wrapped = self._wrap(model)
        self.pad_id = pad_id
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        self.save_extra = save_extra
        self.output_dir = Path(config.output_dir)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.eval_examples = list(eval_examples)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.flat = padding_free(model, self.device, self.amp_dtype)
        self.guard = LoopGuard(config.on_nonfinite, config.divergence_ratio, loss_scaled=self.scaler is not None,
                               say=self._warn if self.world.is_main else None)
        self.graphed = self._graphed_step()
        graphed = self.graphed is not None
        self.batches = RankMicroBatches(train_examples, config.micro_batch_size, self.world, pad_id=pad_id,
                                        seed=config.seed, packing=config.packing,
                                        max_seq_length=config.max_seq_length, flat=self.flat,
                                        bucketed=graphed and self.flat, fixed_width=graphed and not self.flat)
        self.total_steps = config.max_steps or math.ceil(
            config.num_epochs * len(self.batches) / config.gradient_accumulation_steps)
        self.optimizer = build_optimizer(model, config)
        warmup = warmup_steps_for(config.warmup_steps, config.warmup_ratio, self.total_steps)
        self.scheduler = build_scheduler(self.optimizer, config.lr_scheduler, warmup, self.total_steps)
        self.state = TrainState(global_micro_batch=self.global_micro_batch)
        memory_note = configure_training_memory(
            model, checkpointing=config.gradient_checkpointing, offload=config.offload_checkpoints,
            mlp_chunk_tokens=config.mlp_chunk_tokens, budget_gib=config.memory_budget_gib,
            batch=config.micro_batch_size, seq=config.max_seq_length)
        for note in (memory_note, embeddings_note):
            if note:
                self.console.print(note)

    def _warn(self, text: str) -> None:
        self.console.print(text, style="yellow", markup=False)     # rows like "conversations[16]" are not markup

    def _offload_embeddings(self, model: nn.Module) -> str | None:
        """`offload_embeddings`: move a frozen, untied input embedding table to host memory (auto:
        when training on a GPU); a note saying so, or None."""
        if not hasattr(model, "put_embeddings_on_host"):
            if self.config.offload_embeddings is True:
                raise TrainConfigError(f"key 'offload_embeddings': a {type(model).__name__} has no "
                                       "put_embeddings_on_host (it is a velotune Transformer option)")
            return None
        mode = self.config.offload_embeddings
        try:
            moved = model.put_embeddings_on_host(mode)
        except EmbeddingOffloadError as exc:
            raise TrainConfigError(f"key 'offload_embeddings': {exc}") from None
        if not moved:
            return None
        table = model.model.embed_tokens.weight
        return (f"input embeddings in host memory (offload_embeddings): "
                f"{table.numel() * table.element_size() / 2**30:.2f} GiB off the {self.device.type} device")

    @property
    def global_micro_batch(self) -> int:
        """Rows per micro-batch over all ranks: what a checkpoint's data position counts in."""
        return self.config.micro_batch_size * self.world.world_size

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.strategy == "ddp":
            return distributed.wrap_ddp(model, self.world)
        if self.strategy == "fsdp":
            mixed = self.amp_dtype if self.config.fsdp_mixed_precision else None
            return distributed.wrap_fsdp(model, self.world, device_type=self.device.type, param_dtype=mixed,
                                         cpu_offload=self.config.fsdp_cpu_offload)
        return model

    def _graphed_step(self) -> GraphedMicroStep | None:
        """CUDA graphs for the micro-batches (train/graphed_step.py): `cuda_graphs: true` asks for
        them (an error says what stands in the way), `auto` takes them where nothing does and the
        micro-batches come in few shapes (padding-free ones in bucketed widths, or packed rows
        padded to max_seq_length), `false` never."""
        mode = self.config.cuda_graphs
        if mode is False:
            return None
        blockers = [] if self.device.type == "cuda" else [f"training runs on {self.device.type}"]
        blockers += graph_blockers(self.model)
        if self.strategy != "none":
            blockers.append(f"{self.strategy} reduces gradients with host-side hooks")
        if self.scaler is not None:
            blockers.append("float16 training rescales its loss on the host")
        if self.config.optimizer == "galore":
            blockers.append("galore projects gradients on the host")
        if mode is True and blockers:
            raise TrainConfigError("key 'cuda_graphs': cannot be used here: " + "; ".join(blockers))
        if blockers or (mode == "auto" and not (self.flat or self.config.packing)):
            return None
        return GraphedMicroStep(self.model, self.params, amp_dtype=self.amp_dtype, max_shapes=MAX_GRAPHED_SHAPES)

    # --- one step ---------------------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def forward_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, target count) of one collated batch."""
        host_ids = batch["input_ids"]
        ids = host_ids.to(self.device)                                # type: ignore[union-attr]
        stage_host_ids(self.model, ids, host_ids)                     # type: ignore[arg-type]
        labels = batch["labels"].to(self.device)                      # type: ignore[union-attr]
        positions = batch["position_ids"].to(self.device)             # type: ignore[union-attr]
        with self.autocast():
            out = self.wrapped(ids, position_ids=positions, labels=labels, return_logits=False,
                               documents=batch_documents(batch, self.device))
        return out.loss_sum.float(), out.num_targets

    def step_counts(self, micro_batches: Sequence[Batch]) -> tuple[int, int]:
        """(target tokens, real input tokens) of one optimizer step summed over all ranks, known
        before any forward (one all-reduce)."""
        local = [sum(int(b["num_target_tokens"]) for b in micro_batches),       # type: ignore[arg-type]
                 sum(int(b.get("num_tokens") or 0) for b in micro_batches)]      # type: ignore[arg-type]
        total = distributed.global_sum(torch.tensor(local, dtype=torch.float64, device=self.device), self.world)
        return int(total[0]), int(total[1])

    def accumulate(self, micro_batches: Sequence[Batch], targets: int | None = None) -> tuple[float, int]:
        """Backward over the micro-batches of one optimizer step, normalised by the step's target
        count over all ranks (`targets`, else counted here); returns (loss of the step over all
        ranks, its target tokens). Gradients are added to .grad (reduced over ranks on the last
        micro-batch)."""
        total = self.step_counts(micro_batches)[0] if targets is None else targets
        if total == 0:
            raise ValueError("an optimizer step has no target tokens (every label is -100)")
        scale = distributed.loss_scale(self.world, averaged=self.strategy != "none") / total
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(micro_batches):
            if self.graphed is not None:
                summed = self.graphed(batch["input_ids"], batch["labels"], batch["position_ids"], scale,  # type: ignore[arg-type]
                                      cu_seqlens=batch.get("cu_seqlens"),                                # type: ignore[arg-type]
                                      max_document_length=batch.get("max_document_length"))              # type: ignore[arg-type]
                loss_sum += summed.double()
                continue
            with distributed.gradient_sync(self.wrapped, enabled=i == len(micro_batches) - 1):
                summed, _ = self.forward_sum(batch)
                scaled = summed * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += summed.detach().double()
        return float(distributed.global_sum(loss_sum, self.world)) / total, total

    def optimizer_step(self, micro_batches: Sequence[Batch]) -> StepOutcome:
        """One full step: accumulate, clip, update, schedule."""
        lr = self.scheduler.get_last_lr()[0]
        targets, tokens = self.step_counts(micro_batches)
        loss, _ = self.accumulate(micro_batches, targets)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        grad_norm = distributed.local_norm(torch.nn.utils.clip_grad_norm_(self.params, limit))
        if not self.guard.admit(self, micro_batches, loss, grad_norm, lr):     # a non-finite step, skipped
            return StepOutcome(math.nan, grad_norm, lr, 0, tokens)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss, grad_norm, lr, targets, tokens)

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, examples: Sequence[Example] | None = None) -> float:
        """Mean token loss over `examples` (default: the eval split)."""
        examples = self.eval_examples if examples is None else examples
        return evaluate_loss(self.model, examples, self.config.micro_batch_size, self.pad_id, self.amp_dtype,
                             world=self.world, device=self.device, flat=self.flat)

    def _evaluate_into(self, result: TrainResult, log: RunLog) -> None:
        result.eval_losses[self.state.step] = loss = self.evaluate()
        log.write({"step": self.state.step, "eval_loss": loss})
        log.message(f"step {self.state.step}: eval loss {loss:.4f}")
        self.guard.observe_eval(self.state.step, loss)

    # --- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Every rank calls it: FSDP ranks write their shards, rank 0 the rest (see checkpoint.py)."""
        sharded = self.strategy == "fsdp"

        def write(folder: Path) -> None:
            write_contents(folder, self.model, self.optimizer, self.scheduler, self.state, self.save_extra,
                           with_weights=not sharded)

        def write_shards(folder: Path) -> None:
            write_sharded(folder, self.model, self.optimizer)
        return write_atomically(self.output_dir, self.state.step, write, keep=self.config.save_total_limit,
                                world=self.world, write_every_rank=write_shards if sharded else None)

    def resume_from(self, folder: Path) -> None:
        """Every rank calls it. The data position counts global micro-batches, so it means the
        same rows only when micro_batch_size x ranks is the one the checkpoint was written with."""
        state = read_contents(folder, self.model, self.optimizer, self.scheduler, world=self.world)
        if state.global_micro_batch and state.global_micro_batch != self.global_micro_batch:
            raise CheckpointError(
                f"{folder}/state.json: written with a global micro-batch of {state.global_micro_batch} rows "
                f"(micro_batch_size x ranks); this run has {self.config.micro_batch_size} x "
                f"{self.world.world_size} = {self.global_micro_batch}. Set micro_batch_size to "
                f"{state.global_micro_batch} / ranks so the data position means the same rows")
        state.global_micro_batch = self.global_micro_batch
        self.state = state
        if self.state.step > self.total_steps:
            raise ValueError(f"{folder}: checkpoint is at step {self.state.step}, past this run's "
                             f"{self.total_steps} steps")

    # --- the loop -----------------------------------------------------------------------------

    @explain_out_of_memory
    def train(self) -> TrainResult:
        cfg, state = self.config, self.state
        if self.world.is_main:
            remove_stale_temporaries(self.output_dir)
        distributed.barrier(self.world)
        result = TrainResult(steps=state.step)
        stream = self.batches.iterate(state.epoch, state.batch_index)
        window = {"loss_sum": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0}
        all_tokens, all_seconds, data_seconds = 0, 0.0, 0.0
        self.model.train()
        log = (RunLog(self.output_dir, self.total_steps, start_step=state.step, console=self.console,
                      show_progress=self.show_progress) if self.world.is_main else _QuietLog())
        with log:
            if self.eval_examples and state.step == 0:
                self._evaluate_into(result, log)
            while state.step < self.total_steps:
                started = time.perf_counter()
                drawn = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
                data_seconds += time.perf_counter() - started    # the GPU idles meanwhile (synchronised)
                micro = [batch for _, _, batch in drawn]
                outcome = self.optimizer_step(micro)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - started
                loss, tokens, targets = outcome.loss, outcome.tokens, outcome.targets
                epoch, index, _ = drawn[-1]
                state.epoch, state.batch_index = (epoch, index + 1) if index + 1 < len(self.batches) else (epoch + 1, 0)
                state.step += 1
                state.tokens_seen += tokens
                state.target_tokens_seen += targets
                state.elapsed_s += seconds
                result.losses.append(loss)
                all_tokens, all_seconds = all_tokens + tokens, all_seconds + seconds
                for key, value in (("loss_sum", loss * targets if targets else 0.0), ("targets", targets),
                                   ("tokens", tokens), ("seconds", seconds)):
                    window[key] += value
                record = None
                if state.step % cfg.logging_steps == 0 or state.step == self.total_steps:
                    record = {"step": state.step,
                              "loss": window["loss_sum"] / window["targets"] if window["targets"] else math.nan,
                              "lr": outcome.lr, "grad_norm": outcome.grad_norm,
                              "tokens_per_s": window["tokens"] / window["seconds"],
                              "peak_memory_gib": peak_memory_gib(self.device), "epoch": state.epoch,
                              "tokens_seen": state.tokens_seen, "train_seconds": round(state.elapsed_s, 3),
                              "data_seconds": round(data_seconds, 3)}
                    log.write(record)
                    window = dict.fromkeys(window, 0.0)
                log.advance(state.step, record)
                if cfg.eval_steps and self.eval_examples and state.step % cfg.eval_steps == 0:
                    self._evaluate_into(result, log)
                if cfg.save_steps and state.step % cfg.save_steps == 0:
                    self.save_checkpoint()
            if self.eval_examples and state.step not in result.eval_losses:
                self._evaluate_into(result, log)
            if self.graphed is not None:
                log.message(self.graphed.describe())
        result.steps = state.step
        result.train_seconds = all_seconds
        result.tokens_per_s = all_tokens / all_seconds if all_seconds else 0.0
        return result
