"""Length-grouped sampling, padded collation, and padding-free packing."""
import random
from collections import Counter

import pytest
import torch

from velotune.data.batching import (
    LengthGroupedSampler,
    collate_packed,
    collate_padded,
    pack,
    pack_examples,
)
from velotune.data.tokenize import IGNORE_INDEX, Example

VOCAB = 50
PAD = 1


def synthetic_examples(count, seed=0, longest=24):
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        n = rng.randint(3, longest)
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        prompt = rng.randint(1, n - 1)
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], f"row {i}"))
    return examples


def target_pairs(batch):
    """(context token, target token) for every position the shifted loss sees."""
    ids, labels = batch["input_ids"], batch["labels"]
    keep = labels[:, 1:] != IGNORE_INDEX
    return Counter(zip(ids[:, :-1][keep].tolist(), labels[:, 1:][keep].tolist()))


def test_collate_padded():
    examples = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8, 9], [IGNORE_INDEX, 9])]
    batch = collate_padded(examples, PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["num_target_tokens"] == 3


def test_sampler_is_deterministic_complete_and_grouped():
    rng = random.Random(3)
    lengths = [rng.randint(1, 1000) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, 8, seed=5)
    batches = sampler.epoch_batches(0)
    assert len(batches) == len(sampler) == 125
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert batches == LengthGroupedSampler(lengths, 8, seed=5).epoch_batches(0)
    assert batches != sampler.epoch_batches(1)
    assert max(lengths[i] for i in batches[0]) == max(lengths)      # the longest goes first

    def padding(order):
        return sum(8 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in order)
    shuffled = list(range(1000))
    random.Random(0).shuffle(shuffled)
    random_batches = [shuffled[j:j + 8] for j in range(0, 1000, 8)]
    assert padding(batches) < padding(random_batches) / 10


def test_sampler_resumes_from_a_position():
    sampler = LengthGroupedSampler(list(range(1, 101)), 4, seed=0)
    full = list(sampler.iterate(epoch=2))
    assert list(sampler.iterate(epoch=2, start=7)) == full[7:]
    assert len(full) == 25


def test_sampler_drop_last():
    sampler = LengthGroupedSampler([3] * 10, 4, drop_last=True)
    assert [len(b) for b in sampler.epoch_batches(0)] == [4, 4] and len(sampler) == 2


def test_pack_fills_rows_without_overflow_and_keeps_every_example():
    lengths = [9, 1, 5, 5, 3, 7, 2, 8, 4, 6]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(10))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5                                     # 50 tokens, so 5 full rows
    assert rows == pack(lengths, 10)
    with pytest.raises(ValueError, match="example 0 has 9 tokens > max_seq_length=8"):
        pack(lengths, 8)


def test_packed_batch_positions_labels_and_targets():
    examples = [Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [IGNORE_INDEX, 9]),
                Example([10, 11, 12, 13], [10, 11, 12, 13])]
    batch = collate_packed([[examples[0], examples[1]], [examples[2]]], PAD)
    assert batch["attention_mask"] is None
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, 12, 13, -100]]
    assert batch["num_target_tokens"] == 6


def test_packing_gives_exactly_the_unpacked_loss():
    examples = synthetic_examples(40)
    padded = collate_padded(examples, PAD)
    rows = pack_examples(examples, 64)
    packed = collate_packed(rows, PAD)
    assert packed["input_ids"].shape[1] <= 64 and len(rows) < len(examples) / 2
    for row, positions in zip(rows, packed["position_ids"].tolist()):
        starts = [p for p, position in enumerate(positions) if position == 0]
        assert starts[:len(row)] == [sum(len(e) for e in row[:k]) for k in range(len(row))]
    assert target_pairs(packed) == target_pairs(padded)
    assert packed["num_target_tokens"] == padded["num_target_tokens"] == sum(
        e.num_targets for e in examples)

    # A model whose logits depend only on the current token: the summed loss is then a
    # function of the (context, target) pairs, which packing must leave unchanged.
    torch.manual_seed(0)
    bigram = torch.nn.Embedding(VOCAB, VOCAB)

    def mean_loss(batch):
        logits = bigram(batch["input_ids"])[:, :-1]
        total = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        return total / batch["num_target_tokens"]

    torch.testing.assert_close(mean_loss(packed), mean_loss(padded))


def test_collate_flat_lays_rows_end_to_end():
    from velotune.data.batching import collate_flat

    examples = [Example([5, 6, 7], [-100, 6, 7]), Example([8, 9], [8, 9])]
    batch = collate_flat(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]     # each first label ignored
    assert batch["cu_seqlens"].tolist() == [0, 3, 5] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_document_length"] == 3 and batch["num_target_tokens"] == 3


def test_collate_flat_pads_with_bounded_documents_and_empty_slots():
    from velotune.data.batching import collate_flat

    examples = [Example([5, 6, 7], [5, 6, 7])]
    batch = collate_flat(examples, pad_id=0, width=10, slots=4, max_len=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7] + [0] * 7]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]]   # pad documents of <= 4
    assert batch["cu_seqlens"].tolist() == [0, 3, 7, 10, 10]                     # last slot empty
    assert (batch["labels"][0, 3:] == -100).all() and batch["max_document_length"] == 4
    with pytest.raises(ValueError, match="do not fit 2 slots"):
        collate_flat(examples, pad_id=0, width=10, slots=2, max_len=4)
    with pytest.raises(ValueError, match="more than width=2"):
        collate_flat(examples, pad_id=0, width=2)
    with pytest.raises(ValueError, match="longer than max_len=2"):
        collate_flat(examples, pad_id=0, max_len=2)


@pytest.mark.parametrize("tokens", [1, 255, 256, 257, 1400, 2048, 2049, 3000, 4097, 8192, 8193, 100_000])
def test_bucket_widths_are_few_and_waste_little(tokens):
    from velotune.widths import bucket_width

    width = bucket_width(tokens)
    assert width >= tokens and width % 256 == 0
    assert width - tokens < 256 or width - tokens <= tokens / 8
    widths = {bucket_width(n) for n in range(1, 8193)}
    assert len(widths) == 24          # 8 up to 2,048, then 8 per doubling to 8,192


def test_document_slots_are_powers_of_two():
    from velotune.data.batching import document_slots

    assert [document_slots(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
