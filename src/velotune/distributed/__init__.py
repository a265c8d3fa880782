"""Many processes through PyTorch's own engine (torchrun, DDP, FSDP2); no-ops in one process.

The trainer asks this package only a few things: who am I (`World`), what is the sum of a number
over all ranks (the global count of target tokens, which makes the loss normalisation exact
across ranks and accumulation steps), which rows are mine (`rank_rows`, `rank_eval_batches`),
how to wrap the model (`wrap_ddp`, `wrap_fsdp`), how to write and read sharded checkpoints
(`sharded_checkpoint`) and how to start torchrun (`launch`).
With one process every answer is trivial, so the single-GPU path stays simple.
"""
from velotune.distributed.gather import gather_plain_model
from velotune.distributed.sharding import rank_eval_batches, rank_rows
from velotune.distributed.world import World, barrier, broadcast_object, current, global_sum, setup, teardown
from velotune.distributed.wrap import (
    STRATEGIES,
    gradient_sync,
    local_norm,
    loss_scale,
    resolve_strategy,
    wrap_ddp,
    wrap_fsdp,
)

__all__ = ["STRATEGIES", "World", "barrier", "broadcast_object", "current", "gather_plain_model", "global_sum",
           "gradient_sync", "local_norm", "loss_scale", "rank_eval_batches", "rank_rows", "resolve_strategy", "setup", "teardown",
           "wrap_ddp", "wrap_fsdp"]
