"""What a preference or RL method contributes to the one training loop, and what it may ask of it.

The trainer (`velotune.train.trainer.Trainer`) owns everything else: accumulation, clipping, the
optimizer step, the schedule, logging, eval, checkpoints, resume, memory settings, ranks. A
method is an objective object with:

- `micro_batches(runner, drawn, step)`: the optimizer step's micro-batches from the units the
  sampler drew (`drawn`: one list of units per draw, this rank's share). Preference methods
  collate; KTO also measures its reference point over the whole step; GRPO generates, scores and
  splits its completions here. `step` seeds GRPO's sampling (None in evaluation).
- `count(batch)`: what the micro-batch adds to the step's divisor (pairs, examples, completions or
  tokens), known before any gradient, so the trainer can sum it over micro-batches and ranks
  first and each micro-batch's backward is on loss_sum / (count of the whole step): exact under
  accumulation and across ranks.
- `tokens(batch)`: real tokens, for throughput.
- `loss(runner, batch)`: (summed loss of the micro-batch, metrics), where a metric is a [sum, count]
  tensor the trainer adds up over the step and all ranks before it logs sum / count; the names
  are `metric_names`, the same on every rank (a rank may report none of them in a micro-batch).
- `evaluate(runner, units)`: eval metrics over held-out units (every rank calls it).
- `rows_per_unit` (rows of the model's batch per unit: 2 for a pair), for memory planning, and
  `graphable` (whether micro-batches keep one shape for CUDA graphs: supervised ones only).
- `sampling(micro_batch_size, accumulation)`: (draws per optimizer step, units per draw), how the
  sampler feeds a step: preference methods draw one micro-batch of units per accumulation step,
  GRPO draws the step's prompts at once.

`Runner` is the part of the trainer an objective uses: the forward pass (autocast, host-memory
embeddings and the DDP wrapper handled there), the plain model for generation and reference
passes, and a sum over ranks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from velotune.data.batching import Batch

Metrics = dict[str, torch.Tensor]     # name -> float64 [sum, count]


class Runner(Protocol):
    device: torch.device
    model: nn.Module          # the plain module: generation and adapter-free reference passes
    world: Any                # velotune.distributed.World

    def forward(self, batch: Batch, *, reference: bool = False) -> Any:
        """The model's output for a collated batch with `token_logps` [B, T-1] (0 off target);
        `reference` runs the model with adapters off, without gradient."""

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over ranks."""


def sequence_logps(token_logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's targets [B], their count [B], at least 1)."""
    targets = (labels[:, 1:] != -100).to(token_logps.device)
    return token_logps.sum(-1), targets.sum(-1).clamp(min=1)


def metric(values: torch.Tensor, count: int | torch.Tensor | None = None) -> torch.Tensor:
    """A [sum, count] metric from per-row values (count defaults to their number)."""
    values = values.detach().double()
    n = values.numel() if count is None else count
    return torch.stack([values.sum(), torch.as_tensor(n, dtype=torch.float64, device=values.device)])


def add_metrics(total: Metrics, more: Metrics) -> None:
    for name, value in more.items():
        total[name] = total[name] + value if name in total else value


def stacked(metrics: Metrics, names: Sequence[str], device: torch.device) -> torch.Tensor:
    """[len(names), 2] sums and counts in `names` order (zeros for a metric not seen), ready for
    one sum over ranks."""
    zero = torch.zeros(2, dtype=torch.float64, device=device)
    return torch.stack([metrics.get(name, zero).to(device) for name in names]) if names else zero[:0].view(0, 2)


def means(totals: torch.Tensor, names: Sequence[str], prefix: str = "") -> dict[str, float]:
    """{prefix + name: sum / count} of the metrics that were seen."""
    return {prefix + name: s / c for name, (s, c) in zip(names, totals.tolist()) if c > 0}


def evaluate_by_loss(runner: Runner, objective: Any, units: Sequence[Any], micro_batch_size: int) -> dict[str, float]:
    """`eval_loss` and `eval_<metric>` of a loss-based objective over `units`: each rank takes every
    world_size-th unit, the sums are added over ranks."""
    world = runner.world
    mine = list(units)[world.rank::world.world_size]
    chunks = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    sums = torch.zeros(2, dtype=torch.float64, device=runner.device)
    metrics: Metrics = {}
    was_training = runner.model.training
    runner.model.eval()
    try:
        with torch.no_grad():
            for batch in objective.micro_batches(runner, chunks, None):
                loss_sum, batch_metrics = objective.loss(runner, batch)
                sums += torch.stack([loss_sum.double(), torch.tensor(float(objective.count(batch)),
                                                                        dtype=torch.float64, device=runner.device)])
                add_metrics(metrics, batch_metrics)
    finally:
        runner.model.train(was_training)
    names = objective.metric_names
    totals = runner.global_sum(torch.cat([sums[None], stacked(metrics, names, runner.device)]))
    loss_sum, count = totals[0].tolist()
    return {"eval_loss": loss_sum / max(count, 1), **means(totals[1:], names, "eval_")}
