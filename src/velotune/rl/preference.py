"""DPO, IPO, ORPO and SimPO: preference pairs, and the objective the trainer runs on them.

Data: rows -> (prompt, chosen, rejected) token ids. Two layouts are accepted, detected per row:
- `prompt` (a string, or a list of messages) with `chosen` and `rejected` (strings: the
  assistant's reply);
- `chosen` and `rejected` as whole conversations (lists of messages) that share every message
  but the last, which must be the assistant's.
The prompt is rendered with the chat template and the generation prompt; each reply is the text
the template adds after it (its end-of-turn token included, so the model learns to stop).

Objective (`PairObjective`, the contract in rl/objective.py): a micro-batch of n pairs is one
right-padded batch of 2n rows, the chosen replies first, labels on the replies only; one forward
gives every reply's summed and length-averaged log-probability. Each pair adds one loss term and
the step divides by its pairs (over every micro-batch and rank). DPO and IPO read a reference:
the same model with its adapters off, without gradient; ORPO and SimPO need none. Logged per step:
`chosen_logp` and `rejected_logp`, the mean per-token log-probability of the chosen and the rejected
replies under the policy, whose gap is the margin the method widens.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from velotune.data.batching import Batch, collate_padded
from velotune.data.files import DataError, Row
from velotune.data.tokenize import IGNORE_INDEX, Example
from velotune.rl.losses import dpo_loss, orpo_loss, simpo_loss
from velotune.rl.objective import Metrics, Runner, evaluate_by_loss, metric, sequence_logps

PAIR_METHODS = ("dpo", "orpo", "simpo")


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str

    def __len__(self) -> int:
        """The longer of its two rows (what the sampler groups by)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def messages(value: Any, row: Row, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        if any(not isinstance(m["content"], str) for m in value):
            raise DataError(f"{row.where}: field {field!r} holds content parts (images?); the preference and RL "
                            "methods train on text only (rows with images train with lora, qlora or full)")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{row.where}: field {field!r} must be a string or a list of {{role, content}} messages")


def reply_text(value: Any, row: Row, field: str) -> str:
    """A reply given as a string, or as messages ending with the assistant's."""
    if isinstance(value, list):
        msgs = messages(value, row, field)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{row.where}: field {field!r} must end with an assistant message")
        value = msgs[-1]["content"]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field {field!r} must be a string")
    return value


def split_row(row: Row) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen reply, rejected reply) of one row."""
    data = row.data
    for field in ("chosen", "rejected"):
        if field not in data or data[field] in (None, ""):
            raise DataError(f"{row.where}: missing field {field!r} (preference rows need chosen and rejected)")
    chosen, rejected = data["chosen"], data["rejected"]
    if "prompt" in data:
        prompt = messages(data["prompt"], row, "prompt")
        return prompt, reply_text(chosen, row, "chosen"), reply_text(rejected, row, "rejected")
    c, r = messages(chosen, row, "chosen"), messages(rejected, row, "rejected")
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


def encode_exchange(tokenizer: Any, prompt: list[dict[str, str]], replies: Sequence[str], where: str,
                    max_seq_length: int) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each reply's ids) within max_seq_length: a long prompt loses its oldest tokens
    (it keeps at least half the length), then replies lose their tail."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    reply_ids = [_reply_ids(tokenizer, prompt, prompt_text, reply, where) for reply in replies]
    budget = max_seq_length - max(map(len, reply_ids))
    prompt_ids = prompt_ids[-max(budget, max_seq_length // 2):]
    room = max_seq_length - len(prompt_ids)
    return prompt_ids, [ids[:room] for ids in reply_ids]


def tokenize_preferences(rows: Sequence[Row], tokenizer: Any, *, max_seq_length: int) -> list[PreferenceExample]:
    """Tokenize every row; prompts too long lose their oldest tokens, replies their tail."""
    if not rows:
        raise DataError("the preference dataset is empty")
    out = []
    for row in rows:
        prompt, chosen, rejected = split_row(row)
        prompt_ids, (chosen_ids, rejected_ids) = encode_exchange(tokenizer, prompt, (chosen, rejected), row.where,
                                                                 max_seq_length)
        out.append(PreferenceExample(prompt_ids, chosen_ids, rejected_ids, row.where))
    return out


def collate_pairs(pairs: Sequence[PreferenceExample], pad_id: int) -> Batch:
    """One right-padded batch of the chosen rows, then the rejected ones; labels only on the
    replies; `pairs` is n."""
    rows = [Example(p.prompt_ids + reply, [IGNORE_INDEX] * len(p.prompt_ids) + reply, p.where)
            for replies in ((p.chosen_ids for p in pairs), (p.rejected_ids for p in pairs))
            for p, reply in zip(pairs, replies)]
    batch = collate_padded(rows, pad_id)
    batch["pairs"] = len(pairs)
    batch["num_tokens"] = sum(map(len, rows))
    return batch


class PairObjective:
    """DPO (`loss_type` sigmoid or ipo), ORPO or SimPO over preference pairs."""

    metric_names = ("chosen_logp", "rejected_logp")
    rows_per_unit = 2                      # a pair is two rows of the batch
    graphable = False                      # micro-batches change shape: no CUDA graphs

    def __init__(self, method: str, *, pad_id: int, beta: float, loss_type: str = "sigmoid",
                 gamma: float = 0.5, micro_batch_size: int = 1) -> None:
        if method not in PAIR_METHODS:
            raise ValueError(f"unknown preference method {method!r} ({', '.join(PAIR_METHODS)})")
        self.method, self.pad_id, self.beta, self.loss_type, self.gamma = method, pad_id, beta, loss_type, gamma
        self.micro_batch_size = micro_batch_size

    def sampling(self, micro_batch_size: int, accumulation: int) -> tuple[int, int]:
        """(draws per optimizer step, units per draw)."""
        return accumulation, micro_batch_size

    def micro_batches(self, runner: Runner, drawn: list[list[PreferenceExample]], step: int | None) -> list[Batch]:
        return [collate_pairs(pairs, self.pad_id) for pairs in drawn if pairs]

    def count(self, batch: Batch) -> int:
        return int(batch["pairs"])  # type: ignore[arg-type]

    def tokens(self, batch: Batch) -> int:
        return int(batch["num_tokens"])  # type: ignore[arg-type]

    def loss(self, runner: Runner, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        n = self.count(batch)
        out = runner.forward(batch)
        total, length = sequence_logps(out.token_logps, batch["labels"])  # type: ignore[arg-type]
        mean = total / length
        if self.method == "orpo":
            losses, _ = orpo_loss(mean[:n], mean[n:], -mean[:n], beta=self.beta)
        elif self.method == "simpo":
            losses = simpo_loss(mean[:n], mean[n:], beta=self.beta, gamma=self.gamma)
        else:
            ref_total, ref_length = sequence_logps(runner.forward(batch, reference=True).token_logps,
                                                   batch["labels"])  # type: ignore[arg-type]
            policy, ref = (mean, ref_total / ref_length) if self.loss_type == "ipo" else (total, ref_total)
            losses = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=self.beta, loss_type=self.loss_type).losses
        return losses.sum(), {"chosen_logp": metric(mean[:n]), "rejected_logp": metric(mean[n:])}

    def evaluate(self, runner: Runner, units: Sequence[PreferenceExample]) -> dict[str, float]:
        return evaluate_by_loss(runner, self, units, self.micro_batch_size)
