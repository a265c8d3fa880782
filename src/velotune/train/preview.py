"""`velotune data CONFIG`: what a run would train on, shown before any training.

The data is read by `train/data.py:load_train_data`, the function `velotune train` calls, with the
tokenizer `velotune train` would load (without the weights), so the rows shown are the examples
the trainer receives: after transforms, template, system prompt, dialogue extension, the chat
template, truncation and the mix's weights.

A token is shown as trained when the loss sees its label, i.e. labels[1:] (the model predicts
token i from the tokens before it, so the first token is never a target). In a terminal trained
tokens are highlighted; elsewhere (a pipe, a file, a CI log) they are wrapped in «» so the
highlighting survives.

Statistics: rows read, dropped by transforms, kept, dropped for having no trainable token left,
truncated (each with the first rows named by file and line), target tokens per example, a
token-length histogram, how full packed rows would be at max_seq_length (and padded
micro-batches, what a run without packing pays on the CPU), the mix's shares, and the data
warnings training would print (empty answers, repeated rows, cut rows).
"""
from __future__ import annotations

import re
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from velotune.data import IGNORE_INDEX, Example, LengthGroupedSampler
from velotune.data.batching import pack
from velotune.data.mixing import describe
from velotune.train.config import TrainConfig
from velotune.train.data import TrainData, source_lines

TRAINED_STYLE = "bold black on green"
MARK_OPEN, MARK_CLOSE = "«", "»"
HISTOGRAM_BINS = 8
BAR_WIDTH = 40


def trained_runs(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The example's text as consecutive runs of tokens, each (text, trained); an image's hundreds
    of tokens shown as one `<image> x N (file)` (image tokens are never trained, so each image
    lies inside one run)."""
    flags = [i > 0 and label != IGNORE_INDEX for i, label in enumerate(example.labels)]
    files = iter(example.images)
    runs, start = [], 0
    for end in range(1, len(flags) + 1):
        if end == len(flags) or flags[end] != flags[start]:
            runs.append((with_images_named(tokenizer.decode(example.input_ids[start:end]), tokenizer, files),
                         flags[start]))
            start = end
    return runs


def with_images_named(text: str, tokenizer, files: Iterator[str]) -> str:
    processor = getattr(tokenizer, "image_processor", None)
    if processor is None:
        return text
    token = processor.image_token
    return re.sub(f"(?:{re.escape(token)})+", lambda run: f"{token} x {len(run.group()) // len(token):,} "
                  f"({Path(next(files, '?')).name})", text)


def render_example(example: Example, tokenizer, *, markers: bool) -> Text:
    text = Text()
    for piece, trained in trained_runs(example, tokenizer):
        if trained:
            text.append(f"{MARK_OPEN}{piece}{MARK_CLOSE}" if markers else piece, style=TRAINED_STYLE)
        else:
            text.append(piece)
    return text


def length_histogram(lengths: Sequence[int], bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """(low, high, count) over equal-width bins from the shortest row to the longest."""
    shortest, longest = min(lengths), max(lengths)
    width = -(-(longest - shortest + 1) // bins)
    counts = [0] * -(-(longest - shortest + 1) // width)
    for length in lengths:
        counts[(length - shortest) // width] += 1
    return [(shortest + b * width, min(shortest + (b + 1) * width - 1, longest), count)
            for b, count in enumerate(counts)]


def packing_fill(lengths: Sequence[int], max_seq_length: int) -> tuple[int, float]:
    """(packed rows, share of their max_seq_length slots holding real tokens), as `packing: true` packs."""
    rows = pack(lengths, max_seq_length)
    return len(rows), sum(lengths) / (len(rows) * max_seq_length)


def padded_fill(lengths: Sequence[int], micro_batch_size: int, seed: int) -> float:
    """Share of real tokens in the first epoch's length-grouped micro-batches padded to their longest."""
    batches = LengthGroupedSampler(lengths, micro_batch_size, seed=seed).epoch_batches(0)
    return sum(lengths) / sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def show(console: Console, config: TrainConfig, data: TrainData, tokenizer, rows: int) -> None:
    say = console.print
    model = config.model or "SmolLM2-135M-Instruct (default)"
    say(f"velotune data: {describe(config.dataset)}, tokenized as {model} would train on it "
        f"(max_seq_length {config.max_seq_length}); nothing is trained", markup=False, highlight=False)
    markers = not console.is_terminal
    legend = f"{MARK_OPEN}trained tokens{MARK_CLOSE}" if markers else Text("trained tokens", style=TRAINED_STYLE)
    if rows:
        say(Text.assemble("the first rows as the trainer receives them; ", legend, " are the targets of the loss"))
    for number, example in enumerate(data.train[:rows], start=1):
        say(f"── row {number}: {example.where} ({len(example)} tokens, {example.num_targets} trained)",
            markup=False, highlight=False, style="bold")
        say(render_example(example, tokenizer, markers=markers), highlight=False)
    show_statistics(console, config, data)


def show_statistics(console: Console, config: TrainConfig, data: TrainData) -> None:
    say = console.print
    report = data.train_report
    read = sum(part.samples.rows for part in data.sources)
    say("statistics", style="bold")
    for line in source_lines(data):
        say(f"  {line}", markup=False, highlight=False)
    held = sum(part.samples.held_rows for part in data.sources)
    transformed = sum(p.samples.transforms.rows_out for p in data.sources if p.samples.transforms is not None)
    after = f" ({transformed} after the transforms)" if any(p.samples.transforms for p in data.sources) else ""
    joined = (f", joined {config.dialogue_extension} per dialogue into {report.total}"
              if config.dialogue_extension > 1 else "")
    say(f"  rows: {read} read{after}, {held} held out for eval, the rest trained{joined}", markup=False,
        highlight=False)
    say(f"  kept {report.kept}, dropped {report.dropped_no_targets} (no trainable token left)"
        + (f": {', '.join(report.dropped_where)}" if report.dropped_where else "")
        + f", truncated {report.truncated} at max_seq_length {config.max_seq_length}"
        + (f": {', '.join(report.truncated_where)}" if report.truncated_where else ""), markup=False, highlight=False)
    if len(data.train) != report.kept:
        say(f"  examples per epoch after the weights: {len(data.train)}", markup=False, highlight=False)
    unique = examples_once(data)
    targets = [example.num_targets for example in unique]
    lengths = [len(example) for example in unique]
    say(f"  target tokens per row: mean {statistics.fmean(targets):.1f}, median {statistics.median(targets):g}, "
        f"min {min(targets)}, max {max(targets)}; {report.target_tokens:,} in all "
        f"({100 * report.target_tokens / sum(lengths):.1f}% of the tokens)", markup=False, highlight=False)
    histogram = Table(title="  tokens per row", box=None, padding=(0, 1), title_justify="left")
    for column, justify in (("tokens", "right"), ("rows", "right"), ("", "left")):
        histogram.add_column(column, justify=justify)       # type: ignore[arg-type]
    bars = length_histogram(lengths)
    top = max(count for _, _, count in bars)
    for low, high, count in bars:
        histogram.add_row(f"{low}-{high}", str(count), "#" * round(BAR_WIDTH * count / top))
    say(histogram)
    say(f"  shortest row {min(lengths)} tokens, longest {max(lengths)} (max_seq_length {config.max_seq_length})",
        markup=False, highlight=False)
    packed_rows, packed = packing_fill(lengths, config.max_seq_length)
    say(f"  packing at max_seq_length {config.max_seq_length}: {len(lengths)} rows fill {packed_rows} packed rows, "
        f"{100 * packed:.1f}% real tokens (packing is {'on' if config.packing else 'off'}); micro-batches of "
        f"{config.micro_batch_size} padded to their longest: {100 * padded_fill(lengths, config.micro_batch_size, config.seed):.1f}% "
        "real tokens", markup=False, highlight=False)
    warnings = report.warnings()
    for warning in warnings:
        say(f"  warning: {warning}", style="yellow", markup=False, highlight=False)
    if not warnings:
        say("  no warnings: no empty answers, repeated rows or cut rows", markup=False, highlight=False)


def examples_once(data: TrainData) -> list[Example]:
    """The training examples without the repeats a weight makes (statistics count each row once)."""
    seen: set[int] = set()
    out = []
    for example in data.train:
        if id(example) not in seen:
            seen.add(id(example))
            out.append(example)
    return out
