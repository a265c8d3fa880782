"""The data side of a run: examples for training and evaluation, and micro-batches in a
deterministic, resumable order.

- `dataset: chatterbot[:cat1,cat2]` reads the bundled chatterbot corpus and holds out whole
  question groups (`held_out_split`), so an eval question was never trained on; any other value
  is a data file read through `velotune.data`, split by a seeded shuffle (`eval_split`), or
  evaluated on `eval_dataset`.
- `MicroBatches` numbers every micro-batch by (epoch, index in that epoch's sampler order); the
  order is a pure function of (seed, epoch), so the position alone resumes a run exactly.
  With packing, the unit the sampler orders is a packed row of up to max_seq_length tokens.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from velotune.data import (
    DataError,
    Example,
    LengthGroupedSampler,
    Sample,
    TokenizeReport,
    collate_packed,
    collate_padded,
    held_out_split,
    load_chatterbot,
    load_samples,
    pack_examples,
    tokenize_samples,
)
from velotune.data.batching import Batch, bucket_width, collate_flat, document_slots, pad_documents
from velotune.train.config import TrainConfig, is_bundled

T = TypeVar("T")


@dataclass
class TrainData:
    train: list[Example]
    eval: list[Example]
    eval_samples: list[Sample]          # the held-out samples, for answers before/after training
    train_report: TokenizeReport
    eval_report: TokenizeReport | None


def read_samples(config: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """(train, eval) samples as the config describes them."""
    bundled = is_bundled(config.dataset)
    if bundled:
        _, _, names = config.dataset.partition(":")
        categories = [name.strip() for name in names.split(",") if name.strip()] or None
        samples: list[Sample] = list(load_chatterbot(categories=categories))
    else:
        samples = load_samples(config.dataset, format=config.dataset_format, seed=config.seed)
    if config.eval_dataset:
        return samples, load_samples(config.eval_dataset, format=config.dataset_format, seed=config.seed)
    if config.eval_split == 0:
        return samples, []
    if bundled:
        train, held = held_out_split(samples, config.eval_split, seed=config.seed)  # type: ignore[arg-type]  (the corpus yields ChatSamples)
        return list(train), list(held)
    return held_out(samples, config.eval_split, config.seed, config.dataset)


def held_out(items: Sequence[T], fraction: float, seed: int, dataset: str) -> tuple[list[T], list[T]]:
    """(train, eval): a seeded `fraction` of the items held out, the rest in their order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(items)))
    if n_eval >= len(items):
        raise DataError(f"{dataset}: {len(items)} rows are too few for eval_split={fraction}")
    held_set = set(order[:n_eval])
    return ([s for i, s in enumerate(items) if i not in held_set],
            [s for i, s in enumerate(items) if i in held_set])


def load_train_data(config: TrainConfig, tokenizer) -> TrainData:
    train_samples, eval_samples = read_samples(config)
    train, train_report = tokenize_samples(train_samples, tokenizer, max_seq_length=config.max_seq_length)
    evaluation, eval_report = ([], None)
    if eval_samples:
        evaluation, eval_report = tokenize_samples(eval_samples, tokenizer, max_seq_length=config.max_seq_length)
    return TrainData(train, evaluation, eval_samples, train_report, eval_report)


class MicroBatches:
    """Micro-batches of `examples` (padded, or packed rows), addressed by (epoch, index)."""

    def __init__(self, examples: Sequence[Example], micro_batch_size: int, *, pad_id: int, seed: int,
                 packing: bool = False, max_seq_length: int | None = None, fixed_width: bool = False,
                 flat: bool = False, bucketed: bool = False) -> None:
        """`fixed_width` (with packing): every packed micro-batch is max_seq_length wide.
        `flat`: padding-free micro-batches, the same rows laid end to end (`collate_flat`);
        `bucketed` (with flat): widths and document slots rounded to the few shapes CUDA graphs
        capture (`bucket_width`, `document_slots`), documents bounded by max_seq_length."""
        if not examples:
            raise DataError("no training examples")
        if bucketed and (not flat or max_seq_length is None):
            raise ValueError("bucketed micro-batches are flat ones and need max_seq_length")
        self.packing = packing
        self.pad_id = pad_id
        self.flat, self.bucketed, self.max_seq_length = flat, bucketed, max_seq_length
        self.width = max_seq_length if packing and fixed_width else None
        if packing:
            if max_seq_length is None:
                raise ValueError("packing needs max_seq_length")
            self.rows: list[list[Example]] = pack_examples(examples, max_seq_length)
        else:
            self.rows = [[example] for example in examples]
        lengths = [sum(len(e) for e in row) for row in self.rows]
        self.sampler = LengthGroupedSampler(lengths, micro_batch_size, seed=seed)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return len(self.sampler)

    def order(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.epoch_batches(epoch))
        return self._epoch_cache[1]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of one epoch, in order (computed once per epoch by `order`)."""
        return self.sampler.epoch_batches(epoch)

    def collate(self, rows: list[int]) -> Batch:
        """The collated micro-batch, with `num_tokens`: its real (non-padding) tokens, and `where`:
        each batch row's provenance ("train.jsonl line 17", packed examples joined by " + "; one
        per document of a padding-free batch)."""
        if self.flat:
            examples = [example for r in rows for example in self.rows[r]]
            batch = self.collate_flat(examples)
            batch["where"] = [example.where for example in examples]
        else:
            if self.packing:
                batch = collate_packed([self.rows[r] for r in rows], self.pad_id, self.width)
            else:
                batch = collate_padded([self.rows[r][0] for r in rows], self.pad_id)
            batch["where"] = [" + ".join(example.where for example in self.rows[r]) for r in rows]
        batch["num_tokens"] = sum(len(example) for r in rows for example in self.rows[r])
        return batch

    def collate_flat(self, examples: list[Example]) -> Batch:
        if not self.bucketed:
            return collate_flat(examples, self.pad_id)
        width = bucket_width(sum(len(example) for example in examples))
        max_len = min(width, self.max_seq_length)           # type: ignore[type-var]
        documents = len(examples) + len(pad_documents(width - sum(len(e) for e in examples), max_len))
        return collate_flat(examples, self.pad_id, width=width, slots=document_slots(documents), max_len=max_len)

    def iterate(self, epoch: int = 0, index: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """(epoch, index, batch) from the given position on, across epochs, without end."""
        while True:
            batches = self.order(epoch)
            for i in range(index, len(batches)):
                yield epoch, i, self.collate(batches[i])
            epoch, index = epoch + 1, 0


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Padded batches in a fixed order, similar lengths together (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    for start in range(0, len(order), batch_size):
        yield collate_padded([examples[i] for i in order[start:start + batch_size]], pad_id)
