"""Who this process is in a torchrun job, and the few collectives the trainer needs.

One process without torchrun's variables is world size 1, and every function here is then a
no-op (or the identity), so the single-GPU path carries no distributed code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    LOCAL_RANK, MASTER_ADDR/PORT); one process without those variables is world size 1.
    `backend` None picks nccl when a GPU is present, gloo otherwise (CPU runs and CI)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE is {world_size} but {name} is not set; start distributed runs "
                               "with torchrun (or velotune train --nproc-per-node N)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return World(rank=rank, world_size=world_size, local_rank=local_rank)


def current() -> World:
    """The world of an already joined process group (World() when there is none)."""
    if not dist.is_initialized():
        return World()
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _spans_ranks(world: World | None) -> bool:
    """Whether a collective is due: over `world` when given (a World() in a process that is part
    of a group, e.g. a one-GPU reference run on rank 0, stays local), else over the joined group."""
    return world.distributed if world is not None else dist.is_initialized()


def barrier(world: World | None = None) -> None:
    """Wait for every rank (e.g. rank 0 has finished writing a file the others will read)."""
    if _spans_ranks(world):
        dist.barrier()


def global_sum(value: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone)."""
    out = value.detach().clone()
    if _spans_ranks(world):
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(value: object, world: World) -> object:
    """Rank 0's `value` on every rank (e.g. a decision only rank 0 could take)."""
    if not world.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
