"""Chat prompts as token ids: a conversation rendered with the tokenizer's chat template, and a
history trimmed to fit the context. Shared by `velotune chat`, `velotune generate` and the
studio's chat, so the three send a model the same prompt for the same conversation."""
from __future__ import annotations

from typing import Any


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def with_system(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def fitting_prompt(tokenizer: Any, system: str | None, history: list[dict[str, str]], room: int) -> list[int]:
    """The prompt ids of `history`, its oldest exchanges dropped (in place) until it fits `room`."""
    ids = prompt_ids(tokenizer, with_system(system, history))
    while len(ids) > room and len(history) > 1:
        del history[:2]
        ids = prompt_ids(tokenizer, with_system(system, history))
    return ids
