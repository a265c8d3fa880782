"""The data side of a run: examples for training and evaluation, and micro-batches in a
deterministic, resumable order.

- Samples come source by source from train/sources.py (files, `datasets` folders or the bundled
  chatterbot corpus, through transforms, templates and dialogue extension, split into train and
  eval). Each source is tokenized on its own, its examples then repeated by its weight
  (data/mixing.py); the report counts every source's rows once, and duplicates across sources.
- `MicroBatches` numbers every micro-batch by (epoch, index in that epoch's sampler order); the
  order is a pure function of (seed, epoch), so the position alone resumes a run exactly.
  With packing, the unit the sampler orders is a packed row of up to max_seq_length tokens.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from velotune.data import (
    DataError,
    Example,
    LengthGroupedSampler,
    Sample,
    TokenizeReport,
    collate_packed,
    collate_padded,
    pack_examples,
    tokenize_samples,
)
from velotune.data.batching import Batch, collate_flat, document_slots, pad_documents
from velotune.widths import bucket_width
from velotune.data.mixing import repeat_by_weight
from velotune.data.tokenize import count_duplicates
from velotune.train.config import TrainConfig
from velotune.train.sources import SourceSamples, read_sources


@dataclass
class SourceExamples:
    """One source in the training set: its samples, and how many examples it adds per epoch."""

    samples: SourceSamples
    examples: int = 0          # tokenized examples kept (once each)
    per_epoch: int = 0         # examples per epoch after its weight


@dataclass
class TrainData:
    train: list[Example]
    eval: list[Example]
    eval_samples: list[Sample]          # the held-out samples, for answers before/after training
    train_report: TokenizeReport
    eval_report: TokenizeReport | None
    sources: list[SourceExamples] = field(default_factory=list)       # the train sources, in order


def tokenize_sources(parts: Sequence[tuple[Sequence[Sample], float]], tokenizer, *, max_seq_length: int,
                     seed: int) -> tuple[list[Example], TokenizeReport, list[tuple[int, int]]]:
    """Examples of every (samples, weight) part, each part's repeated by its weight; the report of
    the rows once each; per part (examples kept, examples per epoch)."""
    examples: list[Example] = []
    unique: list[Example] = []
    report = TokenizeReport(max_seq_length=max_seq_length)
    counts = []
    for number, (samples, weight) in enumerate(parts):
        if not samples:
            counts.append((0, 0))
            continue
        kept, part_report = tokenize_samples(samples, tokenizer, max_seq_length=max_seq_length)
        report.add(part_report)
        unique += kept
        weighted = repeat_by_weight(kept, weight, seed + number)
        examples += weighted
        counts.append((len(kept), len(weighted)))
    if not examples:
        raise DataError("no rows to tokenize")
    count_duplicates(unique, report)          # over every source: a row in two files is a repeat too
    return examples, report, counts


def load_train_data(config: TrainConfig, tokenizer,
                    sources: tuple[list[SourceSamples], list[SourceSamples]] | None = None) -> TrainData:
    """`sources`: what `read_sources(config)` returned (read here when None)."""
    train_parts, eval_parts = read_sources(config) if sources is None else sources
    length = config.max_seq_length
    train, train_report, counts = tokenize_sources([(p.train, p.source.weight) for p in train_parts], tokenizer,
                                                   max_seq_length=length, seed=config.seed)
    held = ([(p.eval, p.source.weight) for p in train_parts] if not eval_parts
            else [(p.train, p.source.weight) for p in eval_parts])
    eval_samples = [s for samples, _ in held for s in samples]
    evaluation, eval_report = ([], None)
    if eval_samples:
        evaluation, eval_report, _ = tokenize_sources(held, tokenizer, max_seq_length=length, seed=config.seed)
    sources = [SourceExamples(part, kept, per_epoch) for part, (kept, per_epoch) in zip(train_parts, counts)]
    return TrainData(train, evaluation, eval_samples, train_report, eval_report, sources)


def source_lines(data: TrainData) -> list[str]:
    """What happened to each source's rows, when there is more to say than the totals: one line
    per source of a mix (rows, weight, examples per epoch) and each source's transforms."""
    lines = []
    for part in data.sources:
        source = part.samples.source
        if len(data.sources) > 1:
            share = part.per_epoch / max(1, len(data.train))
            lines.append(f"{source.path}: {part.samples.rows} rows, {part.examples} examples x weight "
                         f"{source.weight:g} = {part.per_epoch} per epoch ({100 * share:.1f}%)")
        if part.samples.transforms is not None:
            lines.append(f"{source.path}: {part.samples.transforms.summary()}")
    return lines


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
