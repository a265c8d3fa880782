"""Many processes through PyTorch's own engine (torchrun, DDP, FSDP2); no-ops in one process.

The trainer asks this module only a few things: who am I (`World`), what is the sum of a number
over all ranks (the global count of target tokens, which makes the loss normalisation exact
across ranks and accumulation steps), which rows are mine (`rank_rows`), and to wrap the model.
With one process every answer is trivial, so the single-GPU path stays simple.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(backend: str | None = None) -> World:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT); one process without those variables is world size 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return World(rank=rank, world_size=world_size, local_rank=local_rank)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone)."""
    out = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def rank_rows(order: list[int], world: World) -> list[int]:
    """This rank's share of a global order: every rank the same number of rows (the tail that
    does not divide evenly is dropped), interleaved so each step mixes the whole order."""
    usable = len(order) - len(order) % world.world_size
    return order[world.rank:usable:world.world_size]


def wrap_ddp(model: nn.Module, world: World) -> nn.Module:
    """DDP all-reduces only parameters that require grad, so LoRA/QLoRA exchange adapter
    gradients alone. DDP averages gradients over ranks; callers scale their loss by world_size
    when they normalise by a global token count (see `loss_scale`)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


def loss_scale(world: World, wrapped_with_ddp: bool) -> float:
    """DDP divides summed gradients by world_size; a loss already divided by the global token
    count must be multiplied back so the result is the exact global mean."""
    return float(world.world_size) if wrapped_with_ddp else 1.0


def wrap_fsdp(model: nn.Module, *, param_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> nn.Module:
    """FSDP2 (`fully_shard`): each decoder layer is one shard unit, then the root. FSDP2 reduces
    gradients as a sum divided by world size too, so `loss_scale` applies the same way."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
