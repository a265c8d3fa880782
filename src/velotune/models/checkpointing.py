"""How many decoder layers to checkpoint: all, none, or (`auto`) only as many as memory needs.

Checkpointing a layer trades its saved activations (about 34 B x hidden per token for Llama-3
8B shapes) for its input alone (2 B x hidden) plus a second forward of the layer in the backward
(about a third more compute for that layer). When the activations of every layer fit in the
memory budget, checkpointing is pure loss; when none fit, it is needed everywhere. `auto` picks
the smallest number n of checkpointed layers whose estimated peak fits:

    peak(n) = resident + saved(n) + max(model-wide, backward temporaries)          n < L
    peak(L) = resident + saved(L) + max(model-wide, backward temporaries + one recomputed layer)
    saved(n) = n x layer input (offloaded: those `velotune.placement` keeps on the GPU, plus two
                 host-parked layers' tensors in flight)
               + what the first n layers' graphs keep (LoRA: the fused MLP's h @ A_down; a
                 mixture-of-experts layer's route plan) + the last L - n layers' activations

with the per-token terms of `velotune.estimate` (its module docstring states the formula and
how it was measured against an H100), and `resident` the bytes of this model's weights and
buffers, the gradients of its trainable parameters and their optimizer states, counted from the
model itself. The first n layers are the checkpointed ones: their activations would otherwise
live longest, and the backward reaches them only after the un-checkpointed layers' activations
are freed, so with n < L a recomputed layer never coexists with them (n inputs + one layer +
temporaries <= saved(n) + temporaries). So peak(n) falls with n up to L - 1; the last layer's
checkpoint saves little (its backward follows its forward at once): kept on the GPU it costs one
more input and saves what the model-wide buffers exceed the backward temporaries by, so peak(L)
may be above or below peak(L - 1). `auto` takes the fewest layers that fit, and when nothing
fits, the smallest peak, and says it does not fit.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from velotune.estimate import (
    BF16,
    RESERVED_GIB,
    Setup,
    backward_bytes,
    backward_terms,
    checkpoint_terms,
    layer_bytes,
    layer_kinds,
    mlp_wide_bytes,
    model_terms,
    projection_shapes,
)
from velotune.kernels.dispatch import capturing
from velotune.models.config import ModelConfig
from velotune.models.offload import LayerInputOffloader, host_room_bytes
from velotune.models.tiled_mlp import mlp_chunk_size
from velotune.placement import plan_placement

GIB = 2**30
# Kept aside from the device's memory when no budget is given: the CUDA context and workspaces
# (estimate.RESERVED_GIB) plus 5% for allocator fragmentation with many large activations.
FRAGMENTATION_SHARE = 0.05
ADAMW_STATE_BYTES = 8   # two float32 moments per trainable value


def default_budget_bytes(device: torch.device) -> int:
    """The device's memory minus the CUDA context and a fragmentation margin (host RAM on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * (1 - FRAGMENTATION_SHARE) - RESERVED_GIB * GIB)


def resident_bytes(model: nn.Module, optimizer_state_bytes: int = ADAMW_STATE_BYTES) -> int:
    """Bytes that stay on the device whatever the activations: parameters and buffers (shared
    storages once), a gradient per trainable parameter, `optimizer_state_bytes` per trainable value."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        # A sharded (FSDP2) parameter is a DTensor: this rank holds its local shard only.
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:      # tied weights and fused-then-split views count once
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    for p in model.parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * (local.element_size() + optimizer_state_bytes)
    return total


def training_method(model: nn.Module) -> tuple[str, int]:
    """("full" | "lora" | "qlora", LoRA rank) of a model, for the activation terms."""
    rank, quantized = 0, False
    for module in model.modules():
        quantized = quantized or hasattr(module, "dequantized_weight")
        lora_a = getattr(module, "lora_A", None)
        if rank == 0 and isinstance(lora_a, nn.Linear):
            rank = lora_a.out_features
    if rank == 0:
        return "full", 16
    return ("qlora" if quantized else "lora"), rank


@dataclass(frozen=True)
class MemoryBudget:
    """What a training run may use on its device, and what is taken before any activation."""

    total_bytes: int
    resident_bytes: int
    method: str = "lora"      # full | lora | qlora: which activation terms apply
    lora_r: int = 16

    @classmethod
    def of_model(cls, model: nn.Module, budget_gib: float | None = None,
                 optimizer_state_bytes: int = ADAMW_STATE_BYTES) -> MemoryBudget:
        device = next(model.parameters()).device
        total = int(budget_gib * GIB) if budget_gib else default_budget_bytes(device)
        method, rank = training_method(model)
        return cls(total, resident_bytes(model, optimizer_state_bytes), method, rank)


@dataclass(frozen=True)
class CheckpointChoice:
    layers: int               # checkpointed layers (the first `layers` of the stack)
    num_layers: int
    peak_bytes: int           # estimated peak with that choice, resident bytes included
    budget_bytes: int
    batch: int
    seq: int

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def describe(self) -> str:
        fit = "" if self.fits else " (does NOT fit however many layers are checkpointed: expect out-of-memory)"
        return (f"checkpointing auto: {self.layers} of {self.num_layers} decoder layers checkpointed at "
                f"batch {self.batch} x seq {self.seq}, estimated peak {self.peak_bytes / GIB:.1f} GiB of a "
                f"{self.budget_bytes / GIB:.1f} GiB budget{fit}")


def activation_peak(config: ModelConfig, budget: MemoryBudget, batch: int, seq: int, checkpointed: int, *,
                    offload: bool = False, mlp_chunk: int = 0, host_room: int | None = None,
                    kept_on_gpu: int | str = "auto") -> int:
    """Estimated activation peak (bytes, resident bytes excluded) with the first `checkpointed`
    layers checkpointed; see the module docstring. With `offload`, the checkpointed inputs are
    placed by `velotune.placement.plan_placement` (`host_room` bytes of host memory, None: all
    of them fit)."""
    L = config.num_hidden_layers
    if not 0 <= checkpointed <= L:
        raise ValueError(f"checkpointed layers must be in [0, {L}], got {checkpointed}")
    setup = Setup(method=budget.method, batch=batch, seq=seq, checkpointing=True, lora_r=budget.lora_r)
    tokens = batch * seq
    kinds = layer_kinds(config)           # mixture-of-experts layers keep other tensors than dense ones
    layers = layer_bytes(config, setup)
    recomputed = layer_bytes(config, setup, recomputation=True)
    temporaries = backward_bytes(config, setup)
    if mlp_chunk and mlp_chunk < tokens and not all(kinds):
        # The tiled MLP keeps only its input (already counted as the MLP norm output), not its
        # [tokens x intermediate] tensors; its backward remakes them, and their gradients, for one
        # chunk. Mixture-of-experts layers are never tiled.
        saved_wide, grad_wide = mlp_wide_bytes(config, setup)
        layers = [n if moe else n - saved_wide * tokens for n, moe in zip(layers, kinds)]
        recomputed = [n if moe else n - saved_wide * tokens for n, moe in zip(recomputed, kinds)]
        dense = sum(t.bytes(tokens) for t in backward_terms(config, setup))
        candidates = [dense + (saved_wide + grad_wide) * mlp_chunk - grad_wide * tokens]
        if any(kinds):
            candidates.append(sum(t.bytes(tokens) for t in backward_terms(config, setup, moe=True)))
        temporaries = max(candidates)
    model_wide = sum(term.bytes(tokens) for term in model_terms(config, setup))
    layer_input = BF16 * config.hidden_size * tokens
    # besides its input, a checkpointed layer keeps what its graph holds outside the saved tensors
    # (the fused LoRA MLP's h @ A_down, a mixture-of-experts layer's route plan), on the GPU even
    # when the input is offloaded
    graph_kept = [sum(t.bytes(tokens) for t in checkpoint_terms(config, setup, moe)) - layer_input for moe in kinds]
    if offload:
        # Two host-parked layers' tensors are on the GPU at a time (one restored, the next
        # prefetched), beside the inputs the plan keeps on the GPU.
        placement = plan_placement(config, tokens, BF16, checkpointed, offload=True, host_room=host_room,
                                   kept_on_gpu=kept_on_gpu)
        kept_inputs = placement.in_flight_bytes + placement.gpu_bytes
    else:
        kept_inputs = checkpointed * layer_input
    saved = kept_inputs + sum(graph_kept[:checkpointed]) + sum(layers[checkpointed:])
    return saved + max(model_wide, temporaries + (max(recomputed) if checkpointed == L else 0))


def choose_checkpointed_layers(config: ModelConfig, budget: MemoryBudget, batch: int, seq: int, *,
                               offload: bool = False, mlp_chunk: int = 0, host_room: int | None = None,
                               kept_on_gpu: int | str = "auto") -> CheckpointChoice:
    """The fewest checkpointed layers whose estimated peak fits the budget; when none fits, the
    choice with the smallest peak, flagged as not fitting."""
    L = config.num_hidden_layers
    peaks = [budget.resident_bytes + activation_peak(config, budget, batch, seq, n, offload=offload,
                                                     mlp_chunk=mlp_chunk, host_room=host_room,
                                                     kept_on_gpu=kept_on_gpu) for n in range(L + 1)]
    fitting = [n for n, peak in enumerate(peaks) if peak <= budget.total_bytes]
    n = fitting[0] if fitting else min(range(L + 1), key=peaks.__getitem__)
    return CheckpointChoice(n, L, peaks[n], budget.total_bytes, batch, seq)


def parse_checkpointing(value: bool | str, where: str = "gradient_checkpointing") -> bool | str:
    """True, False or "auto"; anything else is an error naming `where`."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"{where} must be true, false or auto, got {value!r}")


class _Phase(threading.local):
    # Thread-local: the recomputation runs in whichever thread runs the backward (autograd's
    # device threads on CUDA), and only code called from it may see the flag.
    recomputing = False


_PHASE = _Phase()


def recomputing() -> bool:
    """True while a checkpointed layer is being run again in the backward to rebuild what its
    forward saved. Its output is then thrown away, so work whose result feeds only that output
    (the MLP's down projection in a pre-norm layer) can be skipped; see `DecoderLayer.forward`."""
    return _PHASE.recomputing


@contextmanager
def recomputation() -> Iterator[None]:
    """Marks the block as a checkpointed layer's recomputation (`recomputing()`)."""
    outer, _PHASE.recomputing = _PHASE.recomputing, True
    try:
        yield
    finally:   # also when torch's early stop ends the recomputation by raising
        _PHASE.recomputing = outer


def _flagging_recomputation(layer: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`layer`, marking every call after the first (torch's checkpoint runs the function once in
    the forward, then once per recomputation) as a recomputation."""
    calls = 0

    def run(*args, **kwargs) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return layer(*args, **kwargs)
        with recomputation():
            return layer(*args, **kwargs)
    return run


def run_checkpointed(layer: nn.Module, *args, offloader: LayerInputOffloader | None = None, parked: int = 1,
                     **kwargs):
    """`layer(*args, **kwargs)` under torch's non-reentrant checkpoint, its first `parked`
    arguments (the layer input; q, k and v for `DecoderLayer.attention_output`) parked in host
    memory by `offloader` when one is given (see `velotune.models.offload`); during the
    recomputation `recomputing()` is true.
    Inside a CUDA graph capture the RNG state is not saved for the recomputation (reading it is
    not allowed there); the graphed step refuses models with dropout, so nothing is random."""
    rng = not capturing(args[0])
    run = _flagging_recomputation(layer)
    if offloader is None:
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=rng, **kwargs)
    with offloader.saving(*args[:parked]):
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=rng, **kwargs)


def auto_offload_tokens(model: nn.Module, checkpointing: bool | str, budget: MemoryBudget, batch: int, seq: int,
                        *, mlp_chunk: int = 0, graphed: bool = False) -> int | None:
    """`offload_checkpoints: auto`: the fewest tokens a training forward must have for its
    checkpointed inputs to go to host memory (0: every forward), or None for no offload.

    Only layers checkpointed on a CUDA device whose inputs host memory holds are offloaded, and
    only where the offload's per-layer host work (hooks, copies, events) costs no speed or memory
    needs it: every forward under CUDA graphs (`graphed`: a replay does none of that host work) or
    when the estimated peak of the longest micro-batch (batch x seq) with its inputs on the GPU is
    over the budget (`memory_budget_gib`, else the GPU's memory less a margin: `budget`); otherwise,
    eager, the forwards large enough that the GPU, not the host, sets their pace
    (`gpu_bound_tokens`), whose host work then overlaps the GPU's. A run of varying lengths thus
    offloads its long micro-batches, which set its peak, and not its short ones, which wait on the host.

    Measured on H100s (benchmarks/RESULTS.md): Llama-3.1-8B LoRA micro-batch 4 x 2,048 with graphs
    ran 612-647 ms a step offloaded against 646-657 ms not (a layer parked in pieces skips
    recomputing its attention projections), and the default `velotune train` run over rows of
    varying length peaked at 15.43 GiB offloaded against 17.01 not (Unsloth: 16.09) at 1.84x
    Unsloth's speed. Eager, micro-batch 4 offloaded ran 709 ms a step at 16.0 GiB when the graphed
    step without offload ran 706-735 ms (2026-11-23), while micro-batch 1, whose eager step waits
    on the host, went from 0.66x to 0.99x Unsloth's speed when it stopped offloading."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if parse_checkpointing(checkpointing) is False or weight is None or not _on_cuda(weight):
        return None
    if not host_holds_layer_inputs(model.config, batch * seq, weight.element_size()):
        return None
    if graphed or not _fits_on_gpu(model, checkpointing, budget, batch, seq, mlp_chunk):
        return 0
    least = gpu_bound_tokens(model.config)
    return least if batch * seq >= least else None


# A decoder layer's eager training step on an H100 host takes ~12.8 ms of host work whatever its
# size (Llama-3.1-8B, micro-batch 1 x 2,048: a 408.8 ms step, 32 layers, the GPU busy 146.7 ms,
# benchmarks/profile_step.py, 2026-12-08), and its GPU work grows with tokens x the layer's
# projection parameters (forward, recomputation and input gradients: ~6 FLOPs each, at the
# ~5.8e14 FLOP/s that step's kernels ran). The two meet near 1.2e12 token-parameters (8B: ~5,500
# tokens a micro-batch; Llama-3.2-1B: ~20,000); above it the host's offload work hides behind the GPU's.
GPU_BOUND_TOKEN_PARAMETERS = 1.2e12


def gpu_bound_tokens(config: ModelConfig) -> int:
    """The fewest tokens a micro-batch needs for an eager training step to keep the GPU, not the
    host, the bottleneck (see `GPU_BOUND_TOKEN_PARAMETERS`)."""
    per_layer = sum(out * inp for out, inp in projection_shapes(config).values())
    return math.ceil(GPU_BOUND_TOKEN_PARAMETERS / per_layer)


def _fits_on_gpu(model: nn.Module, checkpointing: bool | str, budget: MemoryBudget, batch: int, seq: int,
                 mlp_chunk: int) -> bool:
    """Whether the longest micro-batch's estimated peak, the checkpointed inputs kept on the GPU,
    is within the budget."""
    if checkpointing == "auto":
        on_gpu = choose_checkpointed_layers(model.config, budget, batch, seq, mlp_chunk=mlp_chunk).peak_bytes
    else:
        on_gpu = budget.resident_bytes + activation_peak(model.config, budget, batch, seq,
                                                         model.config.num_hidden_layers, mlp_chunk=mlp_chunk)
    return on_gpu <= budget.total_bytes


def _on_cuda(weight: torch.Tensor) -> bool:
    return weight.device.type == "cuda"


def host_holds_layer_inputs(config: ModelConfig, tokens: int, itemsize: int) -> bool:
    """Whether host memory has room for every decoder layer's input of `tokens` tokens, in this
    process's share of it: each of torchrun's processes on this host (`LOCAL_WORLD_SIZE`) parks
    its own inputs in the same memory."""
    share = host_room_bytes() // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return config.num_hidden_layers * tokens * config.hidden_size * itemsize <= share


def configure_training_memory(model: nn.Module, *, checkpointing: bool | str, offload: bool | str = False,
                              mlp_chunk_tokens: int | None = None, budget_gib: float | None = None,
                              batch: int = 1, seq: int = 2048, graphed: bool = False,
                              optimizer_state_bytes: int = ADAMW_STATE_BYTES) -> str | None:
    """Set a `Transformer`'s checkpointing, offload and MLP tiling for training (`graphed`: the
    micro-batches replay as CUDA graphs, see `auto_offload_tokens`); batch x seq is the longest
    micro-batch, for which offloaded inputs' host buffers are sized. With `auto`, returns the choice at
    the longest micro-batch (batch x seq) as a line for the run log; each forward then chooses
    again for its own length, so shorter batches checkpoint fewer layers."""
    model.gradient_checkpointing = parse_checkpointing(checkpointing)
    mlp_chunk = mlp_chunk_size(mlp_chunk_tokens, batch * seq)
    budget = (MemoryBudget.of_model(model, budget_gib, optimizer_state_bytes)
              if "auto" in (offload, checkpointing) else None)
    least = 0
    if offload == "auto":
        least = auto_offload_tokens(model, checkpointing, budget, batch, seq, mlp_chunk=mlp_chunk, graphed=graphed)
        offload = least is not None
    model.offload_checkpoints = offload
    model.offload_min_tokens = least or 0
    if offload and not graphed:
        # Host buffers sized for the longest micro-batch from the first offloaded forward on, so
        # that a wider one later in a run of varying lengths finds them big enough instead of
        # pinning a new set (a graphed step sets its own, bucketed, figure: graphed_step.py).
        model.offload_pool.max_tokens = batch * seq
    model.mlp_chunk_tokens = mlp_chunk_tokens
    if checkpointing != "auto":
        model.memory_budget = None
        return None
    model.memory_budget = budget
    choice = choose_checkpointed_layers(model.config, budget, batch, seq, offload=offload, mlp_chunk=mlp_chunk)
    return choice.describe()
