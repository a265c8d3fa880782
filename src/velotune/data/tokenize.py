"""Turn samples into token ids and labels, training only on what the model should learn to say.

Labels are aligned with input_ids (NOT shifted; the model shifts): label = token id where the
token is trained, IGNORE_INDEX (-100) elsewhere.

Chat samples are rendered with the model's own chat template, and the assistant tokens are found
from the template itself, so users never type marker strings such as "<|im_start|>assistant".
For assistant turn i we render messages[:i] with the generation prompt and messages[:i+1]; if
the first is a prefix of the second and the second a prefix of the whole conversation, the text
between them is exactly that assistant turn: its content plus the template's end-of-turn token
(trained, so the model learns to stop). Trailing whitespace after the end-of-turn token is not
trained (the template's line break before the next turn). Character spans are mapped to tokens
through the tokenizer's offsets: a token is trained when it overlaps a span.

Some templates are not prefix-stable (for example ones that render the last assistant turn
differently). Then each message's content is searched for in order in the full rendering, and
the end-of-turn marker found by rendering a probe conversation is appended to each assistant
span. If a content cannot be found either (the template rewrites it), a DataError names the row.

Raw text samples: BOS (if the tokenizer adds one) + text + EOS, all trained.

After truncation to max_seq_length, an example with no target left (no trained label after the
model's shift, i.e. in labels[1:]) is dropped and counted; if every example is dropped, that is
an error, because training would silently do nothing.

Kept rows that will probably train something unintended are counted, with the first few named
(`TokenizeReport.warnings`): conversations whose only targets are end-of-turn tokens (empty
assistant answers, which teach the model to answer nothing; the end-of-turn ids are EOS and the
marker `probe_end_of_turn` finds), rows identical to an earlier one after truncation (trained
twice as often), and rows cut at max_seq_length (their ends never trained).
"""
from __future__ import annotations

import multiprocessing
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from velotune.data.files import DataError
from velotune.data.formats import ChatSample, Conversation, Sample, TextSample, message_text

IGNORE_INDEX = -100
PROBE_ANSWER = "velotune probe answer"
REPORTED_DROPS = 5            # rows named per kind of problem


class ChatTokenizer(Protocol):
    """What this module needs from `velotune.tokenizer.Tokenizer`."""

    eos_token_id: int | None
    bos_token_id: int | None

    def apply_chat_template(self, messages: Conversation, *, tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False
                            ) -> tuple[list[int], list[tuple[int, int]]]: ...


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]          # same length as input_ids; IGNORE_INDEX where not trained
    where: str = ""            # provenance, for error messages
    images: tuple[str, ...] = ()                  # image files, in placeholder order
    # What turns them into pixels (tokenizer/image_processor.py). Pixels are made when a batch is
    # collated, not kept: a 896-pixel Gemma 3 image is 9.6 MB of float32, so a data set of ten
    # thousand would hold 96 GB. Every image was opened once when the row was read, so a missing
    # or unreadable file fails then, naming its row, before the model loads.
    image_processor: Any = field(default=None, repr=False, compare=False)

    def image_inputs(self) -> dict[str, torch.Tensor]:
        """The images' model arguments, read and preprocessed now ({} without images): pixels
        [images, C, H, W], or flat patches and `image_grid_thw` for dynamic resolution."""
        if not self.images:
            return {}
        return self.image_processor.inputs(list(self.images), self.where)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Tokens the loss sees after the model's shift (labels[1:] that are trained)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class TokenizeReport:
    total: int = 0
    truncated: int = 0
    dropped_no_targets: int = 0
    target_tokens: int = 0
    dropped_where: list[str] = field(default_factory=list)   # the first few dropped rows
    max_seq_length: int = 0
    truncated_where: list[str] = field(default_factory=list)          # "where (N tokens)"
    end_of_turn_only: int = 0
    end_of_turn_only_where: list[str] = field(default_factory=list)
    duplicates: int = 0
    duplicates_where: list[str] = field(default_factory=list)         # "where = earlier where"

    @property
    def kept(self) -> int:
        return self.total - self.dropped_no_targets

    def add(self, other: TokenizeReport) -> None:
        """Count `other`'s rows in too (the reports of consecutive chunks, in order)."""
        self.total += other.total
        self.truncated += other.truncated
        self.dropped_no_targets += other.dropped_no_targets
        self.target_tokens += other.target_tokens
        self.dropped_where = (self.dropped_where + other.dropped_where)[:REPORTED_DROPS]
        self.truncated_where = (self.truncated_where + other.truncated_where)[:REPORTED_DROPS]
        self.end_of_turn_only += other.end_of_turn_only
        self.end_of_turn_only_where = (self.end_of_turn_only_where + other.end_of_turn_only_where)[:REPORTED_DROPS]

    def summary(self) -> str:
        text = (f"{self.total} examples: {self.kept} kept, {self.truncated} truncated, "
                f"{self.dropped_no_targets} dropped (no trainable tokens left), "
                f"{self.target_tokens} target tokens")
        if self.dropped_where:
            text += f"; dropped e.g. {', '.join(self.dropped_where)}"
        return text

    def warnings(self) -> list[str]:
        """One line per kind of suspicious kept row, with counts and the first rows."""
        found = []
        if self.end_of_turn_only:
            found.append(f"{self.end_of_turn_only} of {self.kept} rows have only end-of-turn tokens to train on "
                         f"(empty assistant answers teach the model to answer nothing): "
                         f"{', '.join(self.end_of_turn_only_where)}")
        if self.duplicates:
            found.append(f"{_rows(self.duplicates, 'repeats', 'repeat')} an earlier row (such rows weigh more than "
                         f"the rest): {', '.join(self.duplicates_where)}")
        if self.truncated:
            found.append(f"{_rows(self.truncated, 'was', 'were')} cut at max_seq_length {self.max_seq_length} "
                         f"(tokens past it are never trained): {', '.join(self.truncated_where)}")
        return found

    def note(self, kind: str, where: str) -> None:
        """Name a row under `kind` ("truncated", "end_of_turn_only", "duplicates") if few are named yet."""
        named = getattr(self, f"{kind}_where")
        if len(named) < REPORTED_DROPS:
            named.append(where)


def _rows(count: int, verb_one: str, verb_many: str) -> str:
    return f"1 row {verb_one}" if count == 1 else f"{count} rows {verb_many}"


def tokenize_samples(samples: Sequence[Sample], tokenizer: ChatTokenizer, *,
                     max_seq_length: int, workers: int | None = None) -> tuple[list[Example], TokenizeReport]:
    """Tokenize, label, truncate; drop examples with nothing left to train. `workers` processes
    share the rows (default: every CPU from PARALLEL_ROWS rows on, where fork exists)."""
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    workers = default_workers(len(samples)) if workers is None else workers
    if workers > 1:
        examples, report = _tokenize_in_processes(samples, tokenizer, max_seq_length, workers)
    else:
        examples, report = _tokenize_rows(samples, tokenizer, max_seq_length)
    count_duplicates(examples, report)
    if not examples:
        raise DataError(
            f"all {report.total} examples have no trainable tokens left after truncation to "
            f"max_seq_length={max_seq_length} (e.g. {', '.join(report.dropped_where)}); "
            "raise max_seq_length or check that the rows have assistant answers"
        )
    return examples, report


# Rendering a chat template is Python (Jinja) work, about 0.6 ms of a chat row's 0.9 ms on this
# project's 2-core CI machine, so 100,000 rows took 43 s in one process. Forked workers share the
# rows and the tokenizer without pickling them; below this many rows a pool's start costs more
# than it saves.
PARALLEL_ROWS = 20_000


def default_workers(rows: int) -> int:
    if rows < PARALLEL_ROWS or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 16)


_SHARED: tuple[Sequence[Sample], ChatTokenizer, int] | None = None   # what forked workers read


def _tokenize_range(bounds: tuple[int, int]) -> tuple[list[Example], TokenizeReport]:
    samples, tokenizer, max_seq_length = _SHARED    # type: ignore[misc]
    return _tokenize_rows(samples[bounds[0]:bounds[1]], tokenizer, max_seq_length)


def _tokenize_in_processes(samples: Sequence[Sample], tokenizer: ChatTokenizer, max_seq_length: int,
                           workers: int) -> tuple[list[Example], TokenizeReport]:
    """The rows in contiguous chunks (four per worker, for balance), tokenized by forked
    processes and joined in order."""
    global _SHARED
    size = -(-len(samples) // (4 * workers))
    chunks = [(start, min(start + size, len(samples))) for start in range(0, len(samples), size)]
    _SHARED = (samples, tokenizer, max_seq_length)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_tokenize_range, chunks)
    finally:
        _SHARED = None
    examples: list[Example] = []
    report = TokenizeReport(max_seq_length=max_seq_length)
    for part_examples, part_report in parts:
        examples += part_examples
        report.add(part_report)
    return examples, report


def _tokenize_rows(samples: Sequence[Sample], tokenizer: ChatTokenizer,
                   max_seq_length: int) -> tuple[list[Example], TokenizeReport]:
    report = TokenizeReport(max_seq_length=max_seq_length)
    examples = []
    end_of_turn: set[int] | None = None
    for sample in samples:
        if isinstance(sample, TextSample):
            example = tokenize_text(sample, tokenizer)
        else:
            example = tokenize_chat(sample, tokenizer)
        report.total += 1
        if len(example) > max_seq_length:
            report.truncated += 1
            report.note("truncated", f"{example.where} ({len(example):,} tokens)")
            if example.images:
                check_image_tokens_kept(example, tokenizer, max_seq_length)
            example = Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length],
                              example.where, example.images, example.image_processor)
        if example.num_targets == 0:
            report.dropped_no_targets += 1
            if len(report.dropped_where) < REPORTED_DROPS:
                report.dropped_where.append(example.where)
            continue
        if isinstance(sample, ChatSample):
            end_of_turn = end_of_turn_ids(tokenizer) if end_of_turn is None else end_of_turn
            if all(label in end_of_turn for label in example.labels[1:] if label != IGNORE_INDEX):
                report.end_of_turn_only += 1
                report.note("end_of_turn_only", example.where)
        report.target_tokens += example.num_targets
        examples.append(example)
    return examples, report


def count_duplicates(examples: Sequence[Example], report: TokenizeReport) -> None:
    """Count the kept rows that repeat an earlier one (same ids and labels), over all the rows
    (after the workers, whose chunks cannot see each other's)."""
    seen: dict[int, str] = {}
    for example in examples:
        key = hash((tuple(example.input_ids), tuple(example.labels), example.images))
        if key in seen:
            report.duplicates += 1
            report.note("duplicates", f"{example.where} = {seen[key]}")
        else:
            seen[key] = example.where


def tokenize_text(sample: TextSample, tokenizer: ChatTokenizer) -> Example:
    ids = list(tokenizer.encode(sample.text, add_special_tokens=True))
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return Example(ids, list(ids), sample.where)


def tokenize_chat(sample: ChatSample, tokenizer: ChatTokenizer) -> Example:
    processor = getattr(tokenizer, "image_processor", None)
    images = sample.images
    if images and processor is None:
        raise DataError(f"{sample.where}: the row holds {len(images)} image(s), but the model has no vision "
                        "tower (train a vision-language model, or drop the images)")
    if processor is not None:
        sample = with_part_lists(sample)
    text, spans = assistant_spans(sample, tokenizer)
    if processor is not None:
        try:                            # read now, so a bad file fails here and names its row
            counts = [processor.tokens_for(processor.open(path, sample.where)) for path in images]
        except ValueError as error:     # ImageError: a missing or unreadable file, named with the row
            raise DataError(str(error)) from None
        text, spans = expand_images(text, spans, processor, counts, sample.where)
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
    return Example(list(ids), label_spans(ids, offsets, spans), sample.where, tuple(images),
                   processor if images else None)


def with_part_lists(sample: ChatSample) -> ChatSample:
    """Every content as a list of parts, the form vision-language chat templates read (some,
    LLaVA's, render a plain string content as nothing)."""
    messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
                for m in sample.messages]
    return ChatSample(messages, sample.where, sample.metadata)


def expand_images(text: str, spans: list[tuple[int, int]], processor, counts: list[int], where: str
                  ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text with each image marker the template wrote replaced by the image's
    tokens (`ImageProcessor.image_text`, `counts[i]` tokens for the i-th image), and the
    assistant spans moved to match."""
    marker = processor.marker
    found = text.count(marker)
    if found != len(counts):
        raise DataError(f"{where}: the chat template wrote {found} image marker(s) {marker!r} for the row's "
                        f"{len(counts)} image(s) (is {marker!r} typed in the text, or does the template drop images?)")
    starts = [m.start() for m in re.finditer(re.escape(marker), text)]
    replacements = [processor.image_text(count) for count in counts]

    def moved(p: int) -> int:
        return p + sum(len(r) - len(marker) for at, r in zip(starts, replacements) if at < p)

    return processor.expand(text, counts), [(moved(a), moved(b)) for a, b in spans]


def check_image_tokens_kept(example: Example, tokenizer: ChatTokenizer, max_seq_length: int) -> None:
    """Cutting a row at max_seq_length may not cut into its images' tokens (an image is all of
    its tokens or it cannot be fed): such a row fails, naming itself."""
    processor = tokenizer.image_processor            # type: ignore[attr-defined]
    image_id = tokenizer.encode(processor.image_token, add_special_tokens=False)
    last = max(i for i, t in enumerate(example.input_ids) if [t] == image_id)
    if last >= max_seq_length:
        taken = sum(1 for t in example.input_ids if [t] == image_id)
        raise DataError(f"{example.where}: the row's {len(example.images)} image(s) take "
                        f"{taken:,} tokens and end at token {last + 1:,}, "
                        f"past max_seq_length={max_seq_length}; raise max_seq_length or use fewer images per row")


def assistant_spans(sample: ChatSample, tokenizer: ChatTokenizer
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns."""
    messages = sample.messages
    full = _render(tokenizer, messages, False, sample.where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, sample.where)
        upto = _render(tokenizer, messages[:i + 1], False, sample.where)
        turn = upto[len(prompt):]
        if not (upto.startswith(prompt) and full.startswith(upto)
                and message_text(message).strip() in turn):
            return full, _spans_by_search(full, messages, probe_end_of_turn(tokenizer),
                                          sample.where)
        start = len(prompt)
        spans.append((start, start + len(turn.rstrip())))
    return full, spans


def _spans_by_search(full: str, messages: Conversation, end_of_turn: str, where: str
                     ) -> list[tuple[int, int]]:
    """Fallback for templates that are not prefix-stable: find each content in order."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        content = message_text(message).strip()
        if message["role"] == "system":
            continue
        start = full.find(content, cursor)
        if start < 0:
            raise DataError(
                f"{where}: the chat template is not prefix-stable and changes the text of "
                f"messages[{i}] ({message['role']}), so its assistant tokens cannot be located"
            )
        end = start + len(content)
        if message["role"] == "assistant":
            after = end + (len(full[end:]) - len(full[end:].lstrip()))
            if end_of_turn and full.startswith(end_of_turn, after):
                end = after + len(end_of_turn)
            spans.append((start, end))
        cursor = end
    return spans


def probe_end_of_turn(tokenizer: ChatTokenizer) -> str:
    """The marker the template writes after an assistant's content (e.g. "<|im_end|>"), or ""."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE_ANSWER}]
    text = _render(tokenizer, probe, False, "a probe conversation")
    after = text[text.rfind(PROBE_ANSWER) + len(PROBE_ANSWER):].split()
    return after[0] if after else ""


def end_of_turn_ids(tokenizer: ChatTokenizer) -> set[int]:
    """EOS and the ids of the template's end-of-turn marker: what an empty answer trains on."""
    ids = set(tokenizer.encode(probe_end_of_turn(tokenizer), add_special_tokens=False))
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def label_spans(ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                spans: Sequence[tuple[int, int]]) -> list[int]:
    """Labels: the token id for tokens overlapping any span, IGNORE_INDEX elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for t, (start, end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if end > span_start and start < span_end:
            labels[t] = ids[t]
    return labels


def _render(tokenizer: ChatTokenizer, messages: Conversation, generation_prompt: bool,
            where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:   # template errors come from jinja2 or the template's own raise
        raise DataError(f"{where}: the chat template failed: {error}") from error
