"""Which rows each rank trains and evaluates on.

Training (`velotune.train.rank_batches.RankMicroBatches`): the length-grouped sampler orders
*global* micro-batches of micro_batch_size x world_size rows (one pure function of (seed, epoch),
the same on every rank); each rank takes an interleaved share (`rank_rows`) of every global
micro-batch. The remainder is DROPPED, never padded: a global
micro-batch whose size does not divide by the world size loses its last rows, and one with fewer
rows than ranks is skipped, so every rank runs exactly the same number of micro-batches and
optimizer steps, and no row is seen twice in an epoch. With one rank nothing is dropped.
With N ranks x micro-batch b the global micro-batches are those of one rank x micro-batch N*b,
so both runs see the same rows in the same steps.

Evaluation drops nothing (eval loss must not depend on the number of ranks): a rank left without
rows in the last eval batch evaluates a row whose labels are all ignored, which adds nothing to
the loss but keeps FSDP's collectives in step.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from velotune.data import IGNORE_INDEX, Example
from velotune.data.batching import Batch, collate_flat, collate_padded
from velotune.distributed.world import World


def rank_rows(order: list[int], world: World) -> list[int]:
    """This rank's share of a global order: every rank the same number of rows (the tail that
    does not divide evenly is dropped), interleaved so each share mixes the whole order."""
    usable = len(order) - len(order) % world.world_size
    return order[world.rank:usable:world.world_size]


def rank_eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int, world: World, *,
                      flat: bool = False) -> Iterator[Batch]:
    """This rank's share of padded (or, `flat`, padding-free) eval batches of batch_size x
    world_size examples (longest first); every rank yields the same number of batches."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    step = batch_size * world.world_size
    for start in range(0, len(order), step):
        chunk = order[start:start + step]
        mine = [examples[i] for i in chunk[world.rank::world.world_size]]
        if not mine:
            first = examples[chunk[0]]
            mine = [Example(first.input_ids, [IGNORE_INDEX] * len(first), first.where, first.images, first.image_processor)]
        yield collate_flat(mine, pad_id) if flat else collate_padded(mine, pad_id)
