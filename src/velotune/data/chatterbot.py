"""The chatterbot-corpus YAML dialogues as conversations: the demo's real training data.

The YAML files are found through the installed distribution's file list
(`importlib.metadata.distribution("chatterbot-corpus").files`); the package is never imported.
Each file has `categories` and `conversations`, a list of dialogues, each a list of strings that
alternate user, assistant, user, ... A trailing unanswered user line is dropped, and so is an
entry that is a single string instead of a list (one such malformed entry ships in trivia.yml).
YAML is read with the base loader so every scalar stays a string ("yes", "no", "42" would
otherwise become booleans and numbers).

`held_out_split` keeps every dialogue that opens with the same user line on the same side (the
corpus has several answers per question), so a held-out question was never seen in training.
"""
from __future__ import annotations

import importlib.metadata
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import yaml

from velotune.data.files import DataError, Row
from velotune.data.formats import ChatSample

DISTRIBUTION = "chatterbot-corpus"


def corpus_files(language: str = "english") -> list[Path]:
    """The corpus's YAML files for `language`, sorted by name."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the {DISTRIBUTION} distribution is not installed "
                        f"(`pip install {DISTRIBUTION}`)") from None
    marker = f"/data/{language}/"
    files = sorted(Path(distribution.locate_file(entry)) for entry in distribution.files or []
                   if marker in f"/{entry.as_posix()}" and entry.suffix in (".yml", ".yaml"))
    if not files:
        raise DataError(f"{DISTRIBUTION}: no YAML files for language {language!r}")
    return files


def load_chatterbot(language: str = "english",
                    categories: Sequence[str] | None = None) -> list[ChatSample]:
    """All dialogues (optionally only files whose stem is in `categories`, e.g. "ai")."""
    samples = []
    for path in corpus_files(language):
        if categories is not None and path.stem not in categories:
            continue
        samples += read_corpus_file(path)
    if not samples:
        raise DataError(f"{DISTRIBUTION}: no dialogues for categories {list(categories or [])}")
    return samples


def chatterbot_rows(language: str = "english", categories: Sequence[str] | None = None) -> list[Row]:
    """The dialogues as rows of the "messages" layout (what a config's `dataset: chatterbot` reads,
    so transforms and formatting treat the corpus like any file), each named by file and entry."""
    rows = []
    for path in corpus_files(language):
        if categories is None or path.stem in categories:
            rows += read_corpus_rows(path)
    if not rows:
        raise DataError(f"{DISTRIBUTION}: no dialogues for categories {list(categories or [])}")
    return rows


def read_corpus_file(path: Path) -> list[ChatSample]:
    metadata = {"file": path.stem}
    samples = []
    for row in read_corpus_rows(path):
        metadata["categories"] = row.data["categories"]
        samples.append(ChatSample(row.data["messages"], row.where, dict(metadata)))
    return samples


def read_corpus_rows(path: Path) -> list[Row]:
    with path.open(encoding="utf-8") as handle:
        document = yaml.load(handle, Loader=yaml.BaseLoader)
    if not isinstance(document, dict) or not isinstance(document.get("conversations"), list):
        raise DataError(f"{path}: expected a mapping with a 'conversations' list")
    categories = list(document.get("categories") or [])
    rows = []
    for i, lines in enumerate(document["conversations"]):
        where = f"{path} conversations[{i}]"
        if isinstance(lines, str):          # a lone line (trivia.yml has one): nothing answered
            continue
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise DataError(f"{where}: expected a list of strings")
        answered = lines[:len(lines) - len(lines) % 2]
        if not answered:
            continue
        messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": line}
                    for k, line in enumerate(answered)]
        rows.append(Row({"messages": messages, "categories": categories}, str(path), place=f"conversations[{i}]"))
    return rows


def held_out_split(samples: Sequence[ChatSample], fraction: float, *, seed: int = 0
                   ) -> tuple[list[ChatSample], list[ChatSample]]:
    """(train, held_out): about `fraction` of the dialogues, grouped by their first user line."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be between 0 and 1, got {fraction}")
    counts = Counter(_opening(sample) for sample in samples)
    openings = sorted(counts)
    random.Random(seed).shuffle(openings)
    target = round(fraction * len(samples))
    held_openings: set[str] = set()
    held = 0
    for opening in openings:
        if held >= target:
            break
        held_openings.add(opening)
        held += counts[opening]
    train = [s for s in samples if _opening(s) not in held_openings]
    held_out = [s for s in samples if _opening(s) in held_openings]
    return train, held_out


def _opening(sample: ChatSample) -> str:
    """The first user line (a system prompt added by the config is the same for every dialogue)."""
    return next((m["content"] for m in sample.messages if m["role"] == "user"), "")
