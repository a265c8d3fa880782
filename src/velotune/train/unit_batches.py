"""The sampler of the preference and RL methods: the same seeded, length-grouped, resumable order of
global micro-batches as supervised training (`RankMicroBatches`), over their own units (pairs,
KTO examples, prompts), handed to the method uncollated: the method collates them, or generates
from them (GRPO)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from velotune.distributed.sharding import rank_rows
from velotune.distributed.world import World
from velotune.train.rank_batches import RankMicroBatches


class UnitMicroBatches(RankMicroBatches):
    """This rank's share of each global micro-batch of `units` (anything with a length)."""

    def __init__(self, units: Sequence[Any], micro_batch_size: int, world: World, *, seed: int) -> None:
        super().__init__(units, micro_batch_size, world, pad_id=0, seed=seed)

    def collate(self, rows: list[int]) -> list[Any]:  # type: ignore[override]
        return [self.rows[r][0] for r in rank_rows(rows, self.world)]
