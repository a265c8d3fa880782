"""Preference data for DPO and ORPO: rows -> (prompt, chosen, rejected) token ids.

Two layouts are accepted, detected per row:
- `prompt` (a string, or a list of messages) with `chosen` and `rejected` (strings: the
  assistant's reply);
- `chosen` and `rejected` as whole conversations (lists of messages) that share every message
  but the last, which must be the assistant's.
The prompt is rendered with the chat template and the generation prompt; each reply is the text
the template adds after it (its end-of-turn token included, so the model learns to stop).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from velotune.data.files import DataError, Row
from velotune.data.tokenize import IGNORE_INDEX


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str


def _messages(value: Any, row: Row, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{row.where}: field {field!r} must be a string or a list of {{role, content}} messages")


def split_row(row: Row) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen reply, rejected reply) of one row."""
    data = row.data
    for field in ("chosen", "rejected"):
        if field not in data or data[field] in (None, ""):
            raise DataError(f"{row.where}: missing field {field!r} (preference rows need chosen and rejected)")
    chosen, rejected = data["chosen"], data["rejected"]
    if "prompt" in data:
        prompt = _messages(data["prompt"], row, "prompt")
        replies = []
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(value, list):
                msgs = _messages(value, row, field)
                if msgs[-1]["role"] != "assistant":
                    raise DataError(f"{row.where}: field {field!r} must end with an assistant message")
                value = msgs[-1]["content"]
            if not isinstance(value, str):
                raise DataError(f"{row.where}: field {field!r} must be a string")
            replies.append(value)
        return prompt, replies[0], replies[1]
    c, r = _messages(chosen, row, "chosen"), _messages(rejected, row, "rejected")
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise DataError(f"{row.where}: chosen and rejected conversations must end with an assistant message")
    if c[:-1] != r[:-1]:
        raise DataError(f"{row.where}: chosen and rejected conversations differ before their last message")
    if not c[:-1]:
        raise DataError(f"{row.where}: missing field 'prompt' (the conversations hold no prompt)")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def _reply_ids(tokenizer: Any, prompt: list[dict[str, str]], prompt_text: str, reply: str, where: str) -> list[int]:
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(f"{where}: the chat template renders the prompt differently once a reply follows; "
                        "cannot separate the reply")
    text = full[len(prompt_text):].rstrip("\n")
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize_preferences(rows: Sequence[Row], tokenizer: Any, *, max_seq_length: int) -> list[PreferenceExample]:
    """Tokenize every row; prompts too long lose their oldest tokens, replies their tail."""
    if not rows:
        raise DataError("the preference dataset is empty")
    out = []
    for row in rows:
        prompt, chosen, rejected = split_row(row)
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        chosen_ids = _reply_ids(tokenizer, prompt, prompt_text, chosen, row.where)
        rejected_ids = _reply_ids(tokenizer, prompt, prompt_text, rejected, row.where)
        budget = max_seq_length - max(len(chosen_ids), len(rejected_ids))
        keep_prompt = max(budget, max_seq_length // 2)
        prompt_ids = prompt_ids[-keep_prompt:]
        room = max_seq_length - len(prompt_ids)
        out.append(PreferenceExample(prompt_ids, chosen_ids[:room], rejected_ids[:room], row.where))
    return out


def collate_pairs(examples: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: the chosen sequences first, then the rejected ones; labels only on
    the replies."""
    seqs = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
