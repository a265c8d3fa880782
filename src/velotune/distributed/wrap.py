"""Wrapping the model for many ranks: DDP for adapters, FSDP2 (`fully_shard`) for full weights.

- DDP keeps a whole replica per rank and all-reduces gradients; it skips parameters that do not
  require grad, so LoRA/QLoRA exchange adapter gradients alone.
- FSDP2 shards every weight, gradient and optimizer state over the ranks (each decoder layer one
  unit, then the root for the embedding, final norm and head), which full fine-tuning of large
  models needs. Mixed precision gathers parameters in bf16 and reduces gradients in float32;
  CPU offload keeps the shards and the optimizer step on the CPU.
Both divide the summed gradient by the world size; `loss_scale` undoes that, because the trainer
already divides the loss by the global target count.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from velotune.distributed.world import World

STRATEGIES = ("auto", "ddp", "fsdp")


def resolve_strategy(requested: str, uses_lora: bool, world: World) -> str:
    """"none" in one process; otherwise ddp or fsdp ("auto": ddp for adapters, fsdp for full)."""
    if requested not in STRATEGIES:
        raise ValueError(f"distributed strategy must be one of {', '.join(STRATEGIES)}, got {requested!r}")
    if not world.distributed:
        return "none"
    if requested == "auto":
        return "ddp" if uses_lora else "fsdp"
    return requested


def wrap_ddp(model: nn.Module, world: World) -> nn.Module:
    """DDP over the trainable parameters (frozen ones are neither bucketed nor reduced)."""
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = next(model.parameters()).is_cuda
    return DistributedDataParallel(model, device_ids=[world.local_rank] if on_gpu else None)


def loss_scale(world: World, averaged: bool) -> float:
    """DDP and FSDP divide summed gradients by world_size; a loss already divided by the global
    token count must be multiplied back so the result is the exact global mean."""
    return float(world.world_size) if averaged else 1.0


def wrap_fsdp(model: nn.Module, world: World | None = None, *, device_type: str | None = None,
              param_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> nn.Module:
    """FSDP2 in place: each decoder layer one shard unit, then the root. Parameters that are
    still on the CPU are moved to the mesh's device layer by layer while being sharded, so a model
    loaded on the CPU never needs one whole copy on a GPU (`cpu_offload` keeps the shards on the
    CPU). `param_dtype` turns on mixed precision: parameters gathered in that dtype, gradients
    reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict = {}
    if world is not None:
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs["mesh"] = init_device_mesh(device_type, (world.world_size,))
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """DDP's `no_sync` when `enabled` is False (accumulation micro-batches before the last: the
    gradients are reduced once, on the last). Anything else runs as is: FSDP2 reduce-scatters
    every micro-batch, which keeps gradients sharded (memory) at the cost of more traffic."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled or not isinstance(wrapped, DistributedDataParallel):
        yield
        return
    with wrapped.no_sync():
        yield


def local_norm(value: torch.Tensor) -> float:
    """A number from `clip_grad_norm_`, which returns a DTensor when the gradients are sharded."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)
