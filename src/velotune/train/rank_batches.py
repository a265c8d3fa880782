"""The distributed sampler: global micro-batches, each rank collating its share.

Why and how the remainder is dropped is told in `velotune.distributed.sharding`.
"""
from __future__ import annotations

from collections.abc import Sequence

from velotune.data import Example
from velotune.data.batching import Batch
from velotune.distributed.sharding import rank_rows
from velotune.distributed.world import World
from velotune.train.data import MicroBatches


class RankMicroBatches(MicroBatches):
    """`MicroBatches` over global micro-batches of micro_batch_size x world_size rows, each
    collated down to this rank's share; (epoch, index) address global micro-batches, so a
    checkpoint position means the same data on every rank."""

    def __init__(self, examples: Sequence[Example], micro_batch_size: int, world: World, *, pad_id: int,
                 seed: int, packing: bool = False, max_seq_length: int | None = None,
                 fixed_width: bool = False, flat: bool = False, bucketed: bool = False) -> None:
        super().__init__(examples, micro_batch_size * world.world_size, pad_id=pad_id, seed=seed,
                         packing=packing, max_seq_length=max_seq_length, fixed_width=fixed_width,
                         flat=flat, bucketed=bucketed)
        self.world = world
        # Short global batches sit at fixed places of the length-grouped cut (chunk tails), so the
        # count kept per epoch does not depend on the epoch's shuffle.
        self._per_epoch = len(self.order(0))
        if self._per_epoch == 0:
            raise ValueError(f"{len(self.rows)} training rows are fewer than the {world.world_size} ranks")

    def __len__(self) -> int:
        return self._per_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return [batch for batch in super().epoch_batches(epoch) if len(batch) >= self.world.world_size]

    def collate(self, rows: list[int]) -> Batch:
        return super().collate(rank_rows(rows, self.world))
