"""An out-of-memory during training, explained: what the estimator says the step needs, part by
part, and the smallest changes of the config that fit the device.

`Trainer.train` is wrapped by `explain_out_of_memory`; a `torch.OutOfMemoryError` from any of its
steps, evals or checkpoints becomes a `TrainingOutOfMemory` whose message has three parts:
1. where: the step, the device and its memory, what was allocated at the failure;
2. the estimate (`velotune.estimate`, the same numbers `velotune estimate` prints, which came
   within 5% of the measured H100 peaks) of the run as configured: weights, optimizer states,
   activations, backward peak;
3. the changes that fit, each alone, in the order they cost least: 8-bit AdamW (`optimizer:
   adamw8bit`), `gradient_checkpointing: auto`, `offload_checkpoints: true` (its layer inputs
   counted as leaving the GPU), a smaller `micro_batch_size` with the accumulation raised to keep
   the rows per step, `method: qlora`, a shorter `max_seq_length`. When none fits alone they are
   combined in that order until the estimate fits.

"Fits" means the estimate is below the device's memory (or `memory_budget_gib`) less the
estimator's RESERVED_GIB for the CUDA context and fragmentation. Without a device size (the CPU)
each change is listed with its estimate. Methods the estimator does not model (GaLore, DPO's
reference pass) get its nearest setup; the advice names the keys to change.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from velotune.estimate import GIB, RESERVED_GIB, Estimate, EstimateError, Setup, checkpoint_term, estimate
from velotune.models.config import ModelConfig
from velotune.train.guard import TrainingStopped

if TYPE_CHECKING:
    from velotune.train.config import TrainConfig
    from velotune.train.trainer import Trainer

MIN_SEQ = 64


class TrainingOutOfMemory(TrainingStopped):
    """The device ran out of memory; the message holds the estimate and the changes that fit."""


def explain_out_of_memory(train: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap `Trainer.train`: an out-of-memory leaves as a `TrainingOutOfMemory` with advice."""
    @functools.wraps(train)
    def guarded(trainer: Trainer, *args: Any, **kwargs: Any) -> Any:
        try:
            return train(trainer, *args, **kwargs)
        except torch.OutOfMemoryError as error:
            raise TrainingOutOfMemory(out_of_memory_message(trainer, error)) from error
    return guarded


@dataclass(frozen=True)
class Change:
    """A change of config keys (as --key=value options) and the setup the estimator sees."""

    options: tuple[str, ...]
    setup: Setup
    offload: bool = False          # offload_checkpoints: the checkpointed layer inputs leave the GPU


def peak(config: ModelConfig, change: Change) -> int:
    """The estimated peak of `change`, the offloaded layer inputs taken off."""
    found = estimate(config, change.setup)
    if change.offload:
        tokens = change.setup.batch * change.setup.seq
        return found.total - checkpoint_term(config, change.setup).bytes(tokens)
    return found.total


def setup_of(config: TrainConfig) -> Setup:
    """The estimator's nearest setup for a training config."""
    method = config.method if config.method in ("full", "qlora") else "lora"
    optim = "adamw8bit" if config.optimizer == "adamw8bit" else "adamw"
    return Setup(method=method, batch=config.micro_batch_size, seq=config.max_seq_length, optim=optim,
                 checkpointing=config.gradient_checkpointing is not False, lora_r=config.lora_r,
                 offload_embeddings=config.offload_embeddings is True)


def candidates(model: ModelConfig, config: TrainConfig, budget: int | None) -> list[Change]:
    """Single changes, cheapest first (see the module docstring). The micro-batch and length are
    the largest that fit alone (1 and MIN_SEQ when none does; halves without a budget)."""
    setup = setup_of(config)
    found: list[Change] = []
    if setup.optim == "adamw" and config.optimizer != "galore":
        found.append(Change(("--optimizer=adamw8bit",), replace(setup, optim="adamw8bit")))
    if not setup.checkpointing:
        found.append(Change(("--gradient_checkpointing=auto",), replace(setup, checkpointing=True)))
    if config.offload_checkpoints is False or not setup.checkpointing:   # (auto offloads what is checkpointed)
        switch = () if setup.checkpointing else ("--gradient_checkpointing=auto",)
        found.append(Change((*switch, "--offload_checkpoints=true"), replace(setup, checkpointing=True), True))
    if setup.batch > 1:
        b = _largest(range(setup.batch - 1, 0, -1), lambda b: replace(setup, batch=b), model, budget, setup.batch // 2)
        rows = config.micro_batch_size * config.gradient_accumulation_steps
        found.append(Change((f"--micro_batch_size={b}", f"--gradient_accumulation_steps={-(-rows // b)}"),
                            replace(setup, batch=b)))
    if setup.method == "lora":
        found.append(Change(("--method=qlora",), replace(setup, method="qlora")))
    if setup.seq > MIN_SEQ:
        found.append(_shorter(model, setup, budget))
    return found


def _largest(values: range, setup_for: Callable[[int], Setup], model: ModelConfig, budget: int | None,
             fallback: int) -> int:
    """The first of `values` (largest first) whose setup fits; `fallback` without a budget, the
    smallest value when none fits."""
    if budget is None:
        return max(1, fallback)
    return next((v for v in values if peak(model, Change((), setup_for(v))) <= budget), values[-1])


def _shorter(model: ModelConfig, setup: Setup, budget: int | None) -> Change:
    """A shorter max_seq_length (a multiple of MIN_SEQ): the longest that fits with `setup`."""
    lengths = range((setup.seq - 1) // MIN_SEQ * MIN_SEQ, MIN_SEQ - 1, -MIN_SEQ)
    seq = _largest(lengths, lambda n: replace(setup, seq=n), model, budget, setup.seq // 2 // MIN_SEQ * MIN_SEQ)
    return Change((f"--max_seq_length={max(seq, MIN_SEQ)}",), replace(setup, seq=max(seq, MIN_SEQ)))


def combined(model: ModelConfig, changes: list[Change], budget: int) -> Change | None:
    """The changes applied together in order (the length last, re-chosen for the rest), each kept
    only if it lowers the estimate, up to the first combination that fits; None when even all of
    them do not."""
    together = Change((), changes[0].setup)
    for change in changes:
        if change.options[0].startswith("--max_seq_length"):
            shorter = _shorter(model, together.setup, budget)
            candidate = Change(together.options + shorter.options, shorter.setup, together.offload)
        else:
            options = together.options + tuple(o for o in change.options if o not in together.options)
            candidate = Change(options, _merge(together.setup, change.setup), together.offload or change.offload)
        if peak(model, candidate) < peak(model, together):
            together = candidate
        if peak(model, together) <= budget:
            return together
    return None


def _merge(a: Setup, b: Setup) -> Setup:
    """Each field at its more frugal value of the two."""
    return replace(a, method="qlora" if "qlora" in (a.method, b.method) else a.method, batch=min(a.batch, b.batch),
                   seq=min(a.seq, b.seq), optim="adamw8bit" if "adamw8bit" in (a.optim, b.optim) else a.optim,
                   checkpointing=a.checkpointing or b.checkpointing)


def breakdown(found: Estimate) -> str:
    return (f"estimated peak {found.total / GIB:.2f} GiB = weights {found.weights / GIB:.2f} + optimizer states "
            f"{found.optimizer / GIB:.2f} + max(activations {found.activations / GIB:.2f}, backward peak "
            f"{found.backward_peak / GIB:.2f}, of which gradients {found.gradients / GIB:.2f})")


def device_budget(trainer: Trainer) -> tuple[str, int | None]:
    """(the device in words, the bytes an estimate must stay under, or None when unknown)."""
    config, device = trainer.config, trainer.device
    total = None
    words = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        total = props.total_memory
        words = (f"{props.name}, {total / GIB:.1f} GiB, {torch.cuda.memory_allocated(device) / GIB:.2f} GiB "
                 "allocated at the failure")
    if config.memory_budget_gib is not None:
        total = int(config.memory_budget_gib * GIB)
        words += f", memory_budget_gib {config.memory_budget_gib:g}"
    return words, None if total is None else total - int(RESERVED_GIB * GIB)


def out_of_memory_message(trainer: Trainer, error: BaseException) -> str:
    config = trainer.config
    where, budget = device_budget(trainer)
    head = (f"out of memory at step {trainer.state.step + 1} ({where}): micro_batch_size "
            f"{config.micro_batch_size} x max_seq_length {config.max_seq_length}, method {config.method}")
    model = getattr(trainer.model, "config", None)
    if not isinstance(model, ModelConfig):
        return f"{head}; {error}"
    try:
        current = estimate(model, setup_of(config))
        changes = candidates(model, config, budget)
    except EstimateError as exc:
        return f"{head}; the estimator cannot model this run ({exc})"
    lines = [head, f"  {breakdown(current)} (velotune estimate)"]
    if budget is None:
        lines.append("  changes and their estimated peaks:")
        lines += [f"    {' '.join(c.options)}: {peak(model, c) / GIB:.2f} GiB" for c in changes]
        return "\n".join(lines)
    fitting = [c for c in changes if peak(model, c) <= budget]
    room = f"{budget / GIB:.2f} GiB usable ({RESERVED_GIB:g} GiB kept for the CUDA context)"
    if fitting:
        lines.append(f"  each of these fits in {room}:")
        lines += [f"    {' '.join(c.options)}: {peak(model, c) / GIB:.2f} GiB" for c in fitting]
    elif changes and (together := combined(model, changes, budget)) is not None:
        lines.append(f"  no single change fits in {room}; together these do:")
        lines.append(f"    {' '.join(together.options)}: {peak(model, together) / GIB:.2f} GiB")
    else:
        lines.append(f"  even every change together does not fit in {room}: use a smaller model or a larger GPU")
    return "\n".join(lines)
