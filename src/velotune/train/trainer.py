"""The training loop of every method: exact gradient accumulation, schedule, clipping, eval,
checkpoints, resume, autocast, memory settings, CUDA graphs, many ranks.

One loop for all methods: a method is an objective (`train/methods.py` builds it; the contract is
in rl/objective.py) that turns a micro-batch into (summed loss, count) and may prepare the step's
micro-batches (GRPO generates them, KTO measures its reference point); supervised fine-tuning is
the objective of train/sft.py. Everything below holds for every method.

Design choices:
- Exact accumulation. An optimizer step takes its k micro-batches up front and counts what its
  loss divides by (target tokens for SFT, from the collated labels; pairs, examples, completions
  or completion tokens for the others) before any forward. Each micro-batch's backward is on
  loss_sum / (count of the whole step), so the summed gradient is exactly that of one batch holding
  all k micro-batches, whatever their lengths or padding. Averaging per-micro-batch means instead
  would weight a short answer's tokens more.
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
- `profile_steps` records those steps with the PyTorch profiler (train/profiling.py).
- SIGTERM stops the run after the step in progress, a checkpoint of it written first
  (train/stop.py): what `velotune studio`'s Stop button sends.
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
from velotune.data.batching import Batch
from velotune.widths import bucket_width
from velotune.distributed import World
from velotune.lora.model import disable_adapters
from velotune.models.checkpointing import configure_training_memory
from velotune.models.host_embedding import EmbeddingOffloadError, stage_host_ids
from velotune.rl.objective import Metrics, add_metrics, means, stacked
from velotune.train.checkpoint import (
    CheckpointError,
    TrainState,
    read_contents,
    remove_stale_temporaries,
    write_atomically,
    write_contents,
    write_sharded,
)
from velotune.train.config import TrainConfig, TrainConfigError, check_values, config_yaml
from velotune.models.loop_graphs import graph_blockers
from velotune.train.graphed_step import GraphedMicroStep
from velotune.train.guard import LoopGuard
from velotune.train.metrics import RunLog, peak_memory_gib
from velotune.train.methods import build_objective
from velotune.train.oom import explain_out_of_memory
from velotune.train.optim import build_optimizer
from velotune.train.profiling import StepProfiler
from velotune.train.rank_batches import RankMicroBatches
from velotune.train.schedule import build_scheduler, warmup_steps_for
from velotune.train.sft import SFTObjective, batch_documents, batch_images, padding_free
from velotune.train.stop import StopOnSignal, StopRequested
from velotune.train.unit_batches import UnitMicroBatches


# Bucketed padding-free widths up to 8 x 2,048 tokens number 24 (velotune/widths.py:bucket_width);
# graphs share one GPU memory pool and one set of offload host buffers, so more shapes cost
# capture time, not memory.
MAX_GRAPHED_SHAPES = 64


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)       # every optimizer step run by this call
    eval_losses: dict[int, float] = field(default_factory=dict)   # step -> eval loss (0 = before)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)   # step -> every eval metric
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
    targets: int           # what the step's loss is divided by (target tokens for SFT), all ranks
    tokens: int            # real (non-padding) input tokens of the step, all ranks
    metrics: dict[str, float] = field(default_factory=dict)   # the method's, e.g. mean reward


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

    `train_examples` are the method's units: `Example`s for lora/qlora/full, preference pairs, KTO
    examples or GRPO prompts (rl/). `objective` is the method (default: `build_objective(config)`,
    which GRPO cannot use: it needs a tokenizer and reward functions).
    `save_extra(folder)` (optional) adds files to every checkpoint, e.g. the PEFT adapter.
    `world` defaults to the joined process group (one process without one); `device` to the
    model's (pass it when FSDP should move a CPU-loaded model to the GPU while sharding).
    `self.model` stays the plain module (for eval and saving); `self.wrapped` is what trains."""

    def __init__(self, model: nn.Module, config: TrainConfig, train_examples: Sequence[Any],
                 eval_examples: Sequence[Any] = (), *, pad_id: int = 0, objective: Any | None = None,
                 console: Console | None = None, show_progress: bool = True,
                 save_extra: Callable[[Path], None] | None = None, world: World | None = None,
                 device: torch.device | None = None) -> None:
        check_values(config, "config")
        self.model, self.config = model, config
        if hasattr(model, "cuda_graphs"):   # the model's own loop graphs: the trainer graphs micro-batches itself
            model.cuda_graphs = False
        self.objective = objective or build_objective(config, pad_id=pad_id)
        self.draws_per_step, units_per_draw = self.objective.sampling(config.micro_batch_size,
                                                                      config.gradient_accumulation_steps)
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
        self.flat = isinstance(self.objective, SFTObjective) and padding_free(model, self.device, self.amp_dtype)
        self.guard = LoopGuard(config.on_nonfinite, config.divergence_ratio, loss_scaled=self.scaler is not None,
                               say=self._warn if self.world.is_main else None)
        self.graphed = self._graphed_step()
        if isinstance(self.objective, SFTObjective):   # examples, collated (padding-free, padded or packed)
            graphed = self.graphed is not None
            self.batches = RankMicroBatches(train_examples, config.micro_batch_size, self.world, pad_id=pad_id,
                                            seed=config.seed, packing=config.packing,
                                            max_seq_length=config.max_seq_length, flat=self.flat,
                                            bucketed=graphed and self.flat, fixed_width=graphed and not self.flat)
        else:
            self.batches = UnitMicroBatches(train_examples, units_per_draw, self.world, seed=config.seed)
        self.total_steps = config.max_steps or math.ceil(config.num_epochs * len(self.batches) / self.draws_per_step)
        self.optimizer = build_optimizer(model, config)
        warmup = warmup_steps_for(config.warmup_steps, config.warmup_ratio, self.total_steps)
        self.scheduler = build_scheduler(self.optimizer, config.lr_scheduler, warmup, self.total_steps)
        self.state = TrainState(global_micro_batch=self.global_micro_batch)
        memory_note = configure_training_memory(
            model, checkpointing=config.gradient_checkpointing, offload=config.offload_checkpoints,
            mlp_chunk_tokens=config.mlp_chunk_tokens, budget_gib=config.memory_budget_gib,
            batch=config.micro_batch_size * self.objective.rows_per_unit, seq=config.max_seq_length,
            graphed=self.graphed is not None)
        self.metrics: dict[str, float] = {}      # the last step's method metrics
        for note in (memory_note, embeddings_note):
            if note:
                self.console.print(note)

    def _say_plain(self, text: str) -> None:
        """Rank 0's lines that hold names rich would read as markup (profiled ops such as "[memory]")."""
        if self.world.is_main:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

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
        if not self.objective.graphable:
            blockers.append(f"method {self.config.method}'s micro-batches change shape")
        if mode is True and blockers:
            raise TrainConfigError("key 'cuda_graphs': cannot be used here: " + "; ".join(blockers))
        if blockers or (mode == "auto" and not (self.flat or self.config.packing)):
            return None
        return GraphedMicroStep(self.model, self.params, amp_dtype=self.amp_dtype, max_shapes=MAX_GRAPHED_SHAPES,
                                max_tokens=bucket_width(self.config.micro_batch_size * self.config.max_seq_length))

    # --- one step ---------------------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def device_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, position ids, labels) of a collated batch on the device; an embedding table in
        host memory gets the CPU copy of the ids (no device-to-host sync)."""
        host_ids = batch["input_ids"]
        ids = host_ids.to(self.device)                                # type: ignore[union-attr]
        stage_host_ids(self.model, ids, host_ids)                     # type: ignore[arg-type]
        return ids, batch["position_ids"].to(self.device), batch["labels"].to(self.device)  # type: ignore[union-attr]

    def forward_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, target count) of one collated batch."""
        ids, positions, labels = self.device_inputs(batch)
        with self.autocast():
            out = self.wrapped(ids, position_ids=positions, labels=labels, return_logits=False,
                               documents=batch_documents(batch, self.device), **batch_images(batch, self.device))
        return out.loss_sum.float(), out.num_targets

    def forward(self, batch: Batch, *, reference: bool = False) -> Any:
        """The output of a collated batch with each target's log-probability (`token_logps`), for
        the preference and RL objectives: through the wrapped model (DDP) while gradients are
        recorded, through the plain one otherwise; `reference` runs it with adapters off and no
        gradient."""
        ids, positions, labels = self.device_inputs(batch)
        if reference:
            with torch.no_grad(), disable_adapters(self.model), self.autocast():
                return self.model(ids, position_ids=positions, labels=labels, return_logits=False,
                                  return_token_logps=True, **batch_images(batch, self.device))
        module = self.wrapped if torch.is_grad_enabled() else self.model
        with self.autocast():
            return module(ids, position_ids=positions, labels=labels, return_logits=False, return_token_logps=True,
                          **batch_images(batch, self.device))

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        return distributed.global_sum(value, self.world)

    def step_counts(self, micro_batches: Sequence[Batch]) -> tuple[int, int]:
        """(what the step's loss divides by, real input tokens) of one optimizer step summed over
        all ranks, known before any forward (one all-reduce)."""
        local = [sum(self.objective.count(b) for b in micro_batches),
                 sum(self.objective.tokens(b) for b in micro_batches)]
        total = distributed.global_sum(torch.tensor(local, dtype=torch.float64, device=self.device), self.world)
        return int(total[0]), int(total[1])

    def accumulate(self, micro_batches: Sequence[Batch], targets: int | None = None) -> tuple[float, int]:
        """Backward over the micro-batches of one optimizer step, normalised by the step's count
        over all ranks (`targets`, else counted here); returns (loss of the step over all ranks,
        its count); the method's metrics of the step land in `self.metrics`. Gradients are added
        to .grad (reduced over ranks on the last micro-batch)."""
        total = self.step_counts(micro_batches)[0] if targets is None else targets
        if total == 0:
            raise ValueError("an optimizer step has no target tokens (every label is -100)")
        scale = distributed.loss_scale(self.world, averaged=self.strategy != "none") / total
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        metrics: Metrics = {}
        for i, batch in enumerate(micro_batches):
            if self.graphed is not None:
                summed = self.graphed(batch["input_ids"], batch["labels"], batch["position_ids"], scale,  # type: ignore[arg-type]
                                      cu_seqlens=batch.get("cu_seqlens"),                                # type: ignore[arg-type]
                                      max_document_length=batch.get("max_document_length"))              # type: ignore[arg-type]
                loss_sum += summed.double()
                continue
            with distributed.gradient_sync(self.wrapped, enabled=i == len(micro_batches) - 1):
                summed, batch_metrics = self.objective.loss(self, batch)
                scaled = summed * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += summed.detach().double()
            add_metrics(metrics, batch_metrics)
        names = self.objective.metric_names      # one all-reduce: the loss sum, then [sum, count] rows
        metrics["loss"] = torch.stack([loss_sum, torch.ones_like(loss_sum)])
        totals = distributed.global_sum(stacked(metrics, ("loss", *names), self.device), self.world)
        self.metrics = means(totals[1:], names)
        return float(totals[0, 0]) / total, total

    def optimizer_step(self, micro_batches: Sequence[Batch]) -> StepOutcome:
        """One full step: accumulate, clip, update, schedule."""
        lr = float(self.scheduler.get_last_lr()[0])     # a tensor for adamw8bit (torchao keeps lr as one)
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
        return StepOutcome(loss, grad_norm, lr, targets, tokens, dict(self.metrics))

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, examples: Sequence[Any] | None = None) -> dict[str, float]:
        """The method's eval metrics over `examples` (default: the eval split): `eval_loss` (mean
        token loss for SFT, mean loss per pair or example for the preference methods), the
        method's own (e.g. `eval_chosen_logp`), or GRPO's `eval_reward`."""
        examples = self.eval_examples if examples is None else examples
        return self.objective.evaluate(self, examples)

    def _evaluate_into(self, result: TrainResult, log: RunLog) -> None:
        result.evals[self.state.step] = metrics = self.evaluate()
        if "eval_loss" in metrics:
            result.eval_losses[self.state.step] = metrics["eval_loss"]
            self.guard.observe_eval(self.state.step, metrics["eval_loss"])
        log.write({"step": self.state.step, **metrics})
        log.message(f"step {self.state.step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items()))

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
        window_metrics: dict[str, list[float]] = {}    # name -> [sum of the logged steps' values, steps]
        all_tokens, all_seconds, data_seconds = 0, 0.0, 0.0
        self.model.train()
        log = (RunLog(self.output_dir, self.total_steps, start_step=state.step, console=self.console,
                      show_progress=self.show_progress, report_to=cfg.report_to, config_yaml=config_yaml(cfg))
               if self.world.is_main else _QuietLog())
        profiler = StepProfiler(cfg.profile_steps, self.output_dir, self.device, say=self._say_plain,
                                rank=self.world.rank if self.world.distributed else None)
        with log, StopOnSignal() as stop:
            if self.eval_examples and state.step == 0:
                self._evaluate_into(result, log)
            while state.step < self.total_steps:
                profiler.before(state.step + 1)
                started = time.perf_counter()
                drawn = [next(stream) for _ in range(self.draws_per_step)]
                data_seconds += time.perf_counter() - started    # the GPU idles meanwhile (synchronised)
                micro = self.objective.micro_batches(self, [batch for _, _, batch in drawn], state.step)
                outcome = self.optimizer_step(micro)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - started
                loss, tokens, targets = outcome.loss, outcome.tokens, outcome.targets
                epoch, index, _ = drawn[-1]
                state.epoch, state.batch_index = (epoch, index + 1) if index + 1 < len(self.batches) else (epoch + 1, 0)
                state.step += 1
                profiler.after(state.step)
                state.tokens_seen += tokens
                state.target_tokens_seen += targets
                state.elapsed_s += seconds
                result.losses.append(loss)
                all_tokens, all_seconds = all_tokens + tokens, all_seconds + seconds
                for key, value in (("loss_sum", loss * targets if targets else 0.0), ("targets", targets),
                                   ("tokens", tokens), ("seconds", seconds)):
                    window[key] += value
                for name, value in outcome.metrics.items():
                    kept = window_metrics.setdefault(name, [0.0, 0])
                    kept[0], kept[1] = kept[0] + value, kept[1] + 1
                record = None
                if state.step % cfg.logging_steps == 0 or state.step == self.total_steps:
                    record = {"step": state.step,
                              "loss": window["loss_sum"] / window["targets"] if window["targets"] else math.nan,
                              "lr": outcome.lr, "grad_norm": outcome.grad_norm,
                              "tokens_per_s": window["tokens"] / window["seconds"],
                              "peak_memory_gib": peak_memory_gib(self.device), "epoch": state.epoch,
                              "tokens_seen": state.tokens_seen, "train_seconds": round(state.elapsed_s, 3),
                              "data_seconds": round(data_seconds, 3),
                              **{name: total / steps for name, (total, steps) in window_metrics.items()}}
                    log.write(record)
                    window = dict.fromkeys(window, 0.0)
                    window_metrics = {}
                log.advance(state.step, record)
                if cfg.eval_steps and self.eval_examples and state.step % cfg.eval_steps == 0:
                    self._evaluate_into(result, log)
                saved = self.save_checkpoint() if cfg.save_steps and state.step % cfg.save_steps == 0 else None
                if state.step < self.total_steps and stop.due(self.world, self.device):
                    folder = saved or self.save_checkpoint()
                    raise StopRequested(f"stopped on request after step {state.step} of {self.total_steps}; "
                                        f"checkpoint {folder}; continue with --resume=true")
            profiler.finish()                              # a run that ended inside profile_steps
            if self.eval_examples and state.step not in result.eval_losses:
                self._evaluate_into(result, log)
            if self.graphed is not None:
                log.message(self.graphed.describe())
        result.steps = state.step
        result.train_seconds = all_seconds
        result.tokens_per_s = all_tokens / all_seconds if all_seconds else 0.0
        return result
