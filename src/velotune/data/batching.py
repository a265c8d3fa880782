"""Order examples into batches and collate them into tensors, padded or packed.

Padded batches: `LengthGroupedSampler` shuffles with a seed, cuts the permutation into
mega-batches of `mega_batch_factor * batch_size` examples and sorts each by length before
cutting it into batches, so a batch holds similar lengths (little padding) while the data order
stays random. The batch holding the longest example goes first, so an out-of-memory shows at
step 1 rather than hours in. The order is a pure function of (seed, epoch), so a run resumes
from (epoch, batch position) exactly. `collate_padded` pads right to the longest example.

Packed batches (padding-free): `pack` fills rows of at most max_seq_length tokens, best-fit
over examples in decreasing length (deterministic; ties by index). In a row, position_ids
restart at 0 for each example, which tells the model where a document starts (attention never
crosses it), so no attention mask is needed. The first label of every example is set to
IGNORE_INDEX: after the model's shift, the last token of one example would otherwise be trained
to predict the first token of the next. An unpacked example never trains its first label
either (nothing precedes it), so packing gives exactly the loss of the unpacked batch. A row
shorter than the batch's longest is padded with a separate "document" of pad tokens (positions
from 0, labels ignored).

Padding-free batches (`collate_flat`, what the trainer uses on a GPU): the examples of a
micro-batch (its rows, or its packed rows' examples) are laid end to end in one row, positions
restarting per example and first labels ignored as in packing, and the batch carries the
documents' start offsets (`cu_seqlens`) for variable-length attention
(`kernels.varlen_attention`). No token is padding, so the loss and gradients are those of the
padded batch without its wasted work. For CUDA graphs, which need a few fixed shapes, the row is
padded to a bucket width (`velotune.widths.bucket_width`: multiples of 256 to 2,048 tokens, then eight steps per
doubling, at most 12.5% padding above 2,048) with a pad "document", and `cu_seqlens` to a fixed
number of slots with empty documents.

Rows with images (vision-language models) carry their pixels: every collation returns
`pixel_values` (and `image_grid_thw` for dynamic resolution, one patch grid per image), the images
of its examples concatenated in the order the examples are laid out,
which is the order of their placeholder tokens in the batch (None without images); the files are
read and preprocessed here, batch by batch, rather than kept in memory for the whole run.

All collations return `num_target_tokens`: the number of labels the loss sees after the shift
(labels[:, 1:] != IGNORE_INDEX), which the trainer uses to normalise the loss exactly across
micro-batches and devices. The same sampler orders packed rows (with their lengths).
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence

import torch

from velotune.data.tokenize import IGNORE_INDEX, Example

Batch = dict[str, torch.Tensor | int | list[str] | None]


class LengthGroupedSampler:
    """Seeded, length-grouped batches of indices; resumable at any (epoch, batch position)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0,
                 mega_batch_factor: int = 50, drop_last: bool = False) -> None:
        if batch_size < 1 or mega_batch_factor < 1:
            raise ValueError("batch_size and mega_batch_factor must be >= 1")
        if not lengths:
            raise ValueError("LengthGroupedSampler needs at least one example")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.drop_last = drop_last

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * self.mega_batch_factor
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        rng.shuffle(batches)
        if batches:
            longest = max(range(len(batches)),
                          key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches.insert(0, batches.pop(longest))
        return batches

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[list[int]]:
        """Batches of `epoch` from batch position `start` on (for resuming)."""
        yield from self.epoch_batches(epoch)[start:]

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full if self.drop_last else full + (rest > 0)


def collate_padded(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example; pad labels are IGNORE_INDEX."""
    width = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    position_ids = torch.arange(width).expand(len(examples), width).clone()
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "position_ids": position_ids, "num_target_tokens": _targets(labels), **image_inputs(examples)}


def pack(lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Indices of the examples in each packed row (best fit, decreasing length)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []          # (room left, row number), sorted
    for i in order:
        if lengths[i] > max_seq_length:
            raise ValueError(f"example {i} has {lengths[i]} tokens > "
                             f"max_seq_length={max_seq_length}; truncate before packing")
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            rows.append([i])
            room, row = max_seq_length, len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(i)
        bisect.insort(free, (room - lengths[i], row))
    return [sorted(row) for row in rows]


def pack_examples(examples: Sequence[Example], max_seq_length: int) -> list[list[Example]]:
    """The examples grouped into packed rows of at most max_seq_length tokens."""
    rows = pack([len(example) for example in examples], max_seq_length)
    return [[examples[i] for i in row] for row in rows]


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, width: int | None = None) -> Batch:
    """Concatenate each row's examples; positions restart per example; first labels ignored.
    Rows are padded to the longest, or to `width` (one shape for every micro-batch, which CUDA
    graphs need: train/graphed_step.py)."""
    longest = max(sum(len(example) for example in row) for row in rows)
    if width is not None and width < longest:
        raise ValueError(f"collate_packed: a packed row holds {longest} tokens, more than width={width}")
    width = longest if width is None else width
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        cursor = 0
        for example in row:
            n = len(example)
            input_ids[r, cursor:cursor + n] = torch.tensor(example.input_ids)
            labels[r, cursor + 1:cursor + n] = torch.tensor(example.labels[1:], dtype=torch.long)
            position_ids[r, cursor:cursor + n] = torch.arange(n)
            cursor += n
        position_ids[r, cursor:] = torch.arange(width - cursor)     # padding: its own document
    return {"input_ids": input_ids, "labels": labels, "attention_mask": None,
            "position_ids": position_ids, "num_target_tokens": _targets(labels),
            **image_inputs([example for row in rows for example in row])}


def image_inputs(examples: Sequence[Example]) -> dict[str, torch.Tensor | None]:
    """{"pixel_values": the images of examples laid out in this order, in the order of their
    placeholder tokens (what `Transformer.embed_with_images` fills them in by), None without
    images} and, for dynamic-resolution images, their "image_grid_thw" in the same order."""
    found = [example.image_inputs() for example in examples if example.images]
    if not found:
        return {"pixel_values": None}
    return {key: torch.cat([f[key] for f in found]) for key in found[0]}


def _targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def document_slots(documents: int) -> int:
    """The fixed number of `cu_seqlens` slots for `documents` documents: the next power of two,
    so a captured graph serves every micro-batch with up to that many."""
    return 1 << max(documents - 1, 0).bit_length()


def pad_documents(padding: int, max_len: int | None) -> list[int]:
    """Lengths of the pad documents that fill `padding` tokens, none longer than `max_len` (so
    `max_len` bounds every document, as the flash kernel needs)."""
    if padding <= 0:
        return []
    piece = padding if max_len is None else max_len
    return [min(piece, padding - start) for start in range(0, padding, piece)]


def collate_flat(examples: Sequence[Example], pad_id: int, *, width: int | None = None, slots: int | None = None,
                 max_len: int | None = None) -> Batch:
    """The examples end to end in one row [1, width] (default: their total, no padding); a shorter
    total is followed by pad documents of at most `max_len` tokens. Returns the padded batch's keys
    plus `cu_seqlens` (int32 [slots + 1]: the documents' start offsets and the width, unused slots
    repeating it) and `max_document_length` (`max_len`, default the longest document: a graph fixes
    it per shape, so it is an upper bound there)."""
    total = sum(len(example) for example in examples)
    width = total if width is None else width
    if width < total:
        raise ValueError(f"collate_flat: the examples hold {total} tokens, more than width={width}")
    lengths = [len(example) for example in examples] + pad_documents(width - total, max_len)
    if max_len is not None and max(lengths) > max_len:
        raise ValueError(f"collate_flat: an example of {max(lengths)} tokens is longer than max_len={max_len}")
    slots = len(lengths) if slots is None else slots
    if slots < len(lengths):
        raise ValueError(f"collate_flat: {len(lengths)} documents do not fit {slots} slots")
    input_ids = torch.full((1, width), pad_id, dtype=torch.long)
    labels = torch.full((1, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((1, width), dtype=torch.long)
    cu_seqlens = torch.full((slots + 1,), width, dtype=torch.int32)
    cursor = 0
    for j, n in enumerate(lengths):
        cu_seqlens[j] = cursor
        position_ids[0, cursor:cursor + n] = torch.arange(n)
        if j < len(examples):
            input_ids[0, cursor:cursor + n] = torch.tensor(examples[j].input_ids)
            labels[0, cursor + 1:cursor + n] = torch.tensor(examples[j].labels[1:], dtype=torch.long)
        cursor += n
    return {"input_ids": input_ids, "labels": labels, "attention_mask": None, "position_ids": position_ids,
            "cu_seqlens": cu_seqlens, "max_document_length": max(lengths) if max_len is None else max_len,
            "num_target_tokens": _targets(labels), **image_inputs(examples)}
