"""Mixed datasets: a weight is how many times each of a file's rows is seen per epoch, so the
epoch's proportions are exact."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from tests.cli.cli_helpers import byte_tokenizer

from velotune.data.mixing import DataSource, describe, parse_sources, repeat_by_weight
from velotune.train.config import TrainConfig
from velotune.train.data import MicroBatches, load_train_data


def test_entries_and_their_errors():
    assert parse_sources("a.jsonl") == [DataSource("a.jsonl")]
    assert parse_sources(["a.jsonl", {"path": "b.parquet", "weight": 2}]) == [DataSource("a.jsonl"),
                                                                             DataSource("b.parquet", 2.0)]
    assert describe([{"path": "a.jsonl", "weight": 2}, "b.csv"]) == "a.jsonl x2 + b.csv"
    for value, message in [([{"path": "a", "wieght": 2}], "entry 1 has unknown key 'wieght' .did you mean 'weight'"),
                           (["a", {"path": "b", "weight": 0}], r"entry 2 \(b\): 'weight' must be a positive number"),
                           ([{"weight": 2}], "entry 1 needs 'path'"), ([], "the list is empty"),
                           ([3], "entry 1 must be a path or a mapping")]:
        with pytest.raises(ValueError, match=message):
            parse_sources(value)


def test_repeats_are_whole_copies_plus_a_seeded_part():
    items = list(range(10))
    assert repeat_by_weight(items, 1.0, 0) == items
    twice_and_a_half = repeat_by_weight(items, 2.5, 0)
    counts = Counter(twice_and_a_half)
    assert len(twice_and_a_half) == 25 and set(counts.values()) == {2, 3} and sum(v == 3 for v in counts.values()) == 5
    assert repeat_by_weight(items, 2.5, 0) == twice_and_a_half != repeat_by_weight(items, 2.5, 1)


def write_rows(path, prefix: str, count: int):
    path.write_text("".join(json.dumps({"instruction": f"{prefix} question {i}", "output": f"{prefix} answer {i}"})
                            + "\n" for i in range(count)), encoding="utf-8")
    return path


def test_weights_give_the_expected_proportions_over_an_epoch(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", "a", 12)
    b = write_rows(tmp_path / "b.jsonl", "b", 10)
    c = write_rows(tmp_path / "c.jsonl", "c", 8)
    config = TrainConfig(dataset=[{"path": str(a), "weight": 2}, str(b), {"path": str(c), "weight": 0.5}],
                         eval_split=0.0, max_seq_length=128)
    data = load_train_data(config, byte_tokenizer())
    assert len(data.train) == 24 + 10 + 4
    assert [(s.examples, s.per_epoch) for s in data.sources] == [(12, 24), (10, 10), (8, 4)]
    assert data.train_report.total == 30 and data.train_report.duplicates == 0   # repeats by weight are not warned about
    batches = MicroBatches(data.train, 4, pad_id=0, seed=0)
    seen = Counter(where for batch in batches.epoch_batches(0) for where in batches.collate(batch)["where"])
    by_file = Counter(where.split(" line ")[0] for where in seen.elements())
    assert by_file == {str(a): 24, str(b): 10, str(c): 4}
    assert {seen[f"{a} line {i}"] for i in range(1, 13)} == {2}                # every row of a exactly twice
    assert sorted(seen[f"{c} line {i}"] for i in range(1, 9)) == [0] * 4 + [1] * 4


def test_eval_split_is_taken_from_every_source(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", "a", 20)
    b = write_rows(tmp_path / "b.jsonl", "b", 10)
    data = load_train_data(TrainConfig(dataset=[str(a), str(b)], eval_split=0.2, max_seq_length=128), byte_tokenizer())
    held = Counter(sample.where.split(" line ")[0] for sample in data.eval_samples)
    assert held == {str(a): 4, str(b): 2}
    assert not {s.where for s in data.eval_samples} & {e.where for e in data.train}
