"""The distributed sampler: each rank a disjoint, equal share of every global micro-batch, the
same number of micro-batches on every rank (remainder dropped), and eval shares that lose no row."""
from __future__ import annotations

from velotune.data import IGNORE_INDEX, Example
from velotune.distributed import World, rank_eval_batches
from velotune.train.rank_batches import RankMicroBatches


def examples(n: int) -> list[Example]:
    return [Example(list(range(3, 5 + i % 7)), [IGNORE_INDEX] + list(range(4, 5 + i % 7)), f"row {i}")
            for i in range(n)]


def shares(n: int, micro_batch_size: int, world_size: int) -> list[RankMicroBatches]:
    return [RankMicroBatches(examples(n), micro_batch_size, World(rank=r, world_size=world_size), pad_id=0, seed=7)
            for r in range(world_size)]


def test_two_ranks_split_the_batches_of_one_rank_with_twice_the_micro_batch():
    single = RankMicroBatches(examples(24), 4, World(), pad_id=0, seed=7)
    ranks = shares(24, 2, 2)
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 6
    for epoch in (0, 1):
        for whole, a, b in zip(single.order(epoch), ranks[0].order(epoch), ranks[1].order(epoch)):
            assert whole == a == b                              # one global order on every rank
        for index, rows in enumerate(single.order(epoch)):
            mine = [ranks[r].collate(rows)["input_ids"].shape[0] for r in (0, 1)]
            assert mine == [2, 2]
            assert int(single.collate(rows)["num_target_tokens"]) == sum(
                int(ranks[r].collate(rows)["num_target_tokens"]) for r in (0, 1))


def test_the_remainder_is_dropped_so_every_rank_takes_the_same_steps():
    # 9 rows, global micro-batches of 4: [4, 4, 1]; the 1-row batch cannot be shared by 2 ranks.
    ranks = shares(9, 2, 2)
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert all(len(batch) == 4 for batch in ranks[0].order(0))
    # 7 rows: [4, 3]; the 3-row batch gives each rank 1 row (its last row is dropped).
    ranks = shares(7, 2, 2)
    sizes = sorted(len(batch) for batch in ranks[0].order(3))
    assert sizes == [3, 4]
    short = next(batch for batch in ranks[0].order(3) if len(batch) == 3)
    assert [ranks[r].collate(short)["input_ids"].shape[0] for r in (0, 1)] == [1, 1]


def test_eval_shares_cover_every_row_once_and_keep_ranks_in_step():
    data = examples(5)
    per_rank = [list(rank_eval_batches(data, 2, 0, World(rank=r, world_size=2))) for r in (0, 1)]
    assert [len(batches) for batches in per_rank] == [2, 2]
    targets = sum(int(b["num_target_tokens"]) for batches in per_rank for b in batches)
    assert targets == sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in data)
    assert int(per_rank[1][1]["num_target_tokens"]) == 0      # the stand-in row: nothing to score
