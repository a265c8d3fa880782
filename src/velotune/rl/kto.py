"""KTO (Ethayarajh et al. 2024): unpaired desirable and undesirable completions, and the objective
the trainer runs on them.

Data. A row is either unpaired, `prompt` + `completion` + `label` (true: desirable), as TRL's
unpaired preference files are, or a preference pair (`prompt`, `chosen`, `rejected`, or two
conversations; rl/preference.py), which gives one desirable and one undesirable example. The
completion is tokenized as the chat template renders an assistant reply after the prompt.

The reference point z0 estimates KL(policy || reference) from mismatched pairs: each example also
carries the completion of another example with a different prompt (the next such example in file
order, fixed when the data is read; a set with one prompt only has no such pair, and its own
completions stand in), and z0 = max(0, mean over the step's examples of
log pi(y'|x) - log ref(y'|x)), held constant (no gradient). It is measured over the whole optimizer
step, every micro-batch and every rank, before any gradient (`micro_batches`), so it is the same
number however the step is split: KTO stays exact under accumulation and across ranks. (TRL
measures it per micro-batch.) Both log-probs are summed over the completion, as in the paper.

Each example adds lambda_D (1 - sigmoid(beta (r - z0))) or lambda_U (1 - sigmoid(beta (z0 - r))),
r = log pi(y|x) - log ref(y|x) (rl/losses.py); the step divides by its examples. Logged: the mean
per-token log-probability of desirable (`chosen_logp`) and undesirable (`rejected_logp`)
completions and `kl`, the reference point.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from velotune.data.batching import Batch, collate_padded
from velotune.data.files import DataError, Row
from velotune.data.tokenize import IGNORE_INDEX, Example
from velotune.rl.losses import kto_loss, kto_reference_point
from velotune.rl.objective import Metrics, Runner, evaluate_by_loss, metric, sequence_logps
from velotune.rl.preference import encode_exchange, messages, reply_text, split_row


@dataclass
class KTOExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    where: str
    kl_completion_ids: list[int] | None = None   # another example's completion (set by tokenize_kto)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def kto_row(row: Row) -> list[tuple[list[dict[str, str]], str, bool]]:
    """(prompt messages, completion, desirable) of one row: one for an unpaired row, two for a pair."""
    data = row.data
    if "completion" not in data:
        prompt, chosen, rejected = split_row(row)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    for field in ("prompt", "label"):
        if field not in data:
            raise DataError(f"{row.where}: missing field {field!r} (KTO rows need prompt, completion and label, "
                            "or prompt, chosen and rejected)")
    if not isinstance(data["label"], bool):
        raise DataError(f"{row.where}: field 'label' must be true (desirable) or false (undesirable), "
                        f"got {data['label']!r}")
    return [(messages(data["prompt"], row, "prompt"), reply_text(data["completion"], row, "completion"),
             data["label"])]


def tokenize_kto(rows: Sequence[Row], tokenizer: Any, *, max_seq_length: int) -> list[KTOExample]:
    """Every row's examples, each with its mismatched completion for the reference point."""
    if not rows:
        raise DataError("the KTO dataset is empty")
    out = []
    for row in rows:
        for prompt, completion, desirable in kto_row(row):
            prompt_ids, [completion_ids] = encode_exchange(tokenizer, prompt, [completion], row.where, max_seq_length)
            out.append(KTOExample(prompt_ids, completion_ids, desirable, row.where))
    for i, example in enumerate(out):
        others = (out[(i + k) % len(out)] for k in range(1, len(out)))
        other = next((e for e in others if e.prompt_ids != example.prompt_ids), example)
        example.kl_completion_ids = other.completion_ids[:max_seq_length - len(example.prompt_ids)]
    return out


def collate_kto(examples: Sequence[KTOExample], pad_id: int) -> Batch:
    """{"main": the completions, "kl": the mismatched completions, "desirable": [n] bool, ...}."""
    def rows(pick) -> Batch:
        return collate_padded([Example(e.prompt_ids + pick(e), [IGNORE_INDEX] * len(e.prompt_ids) + pick(e), e.where)
                               for e in examples], pad_id)

    main = rows(lambda e: e.completion_ids)
    return {"main": main, "kl": rows(lambda e: e.kl_completion_ids), "examples": len(examples),  # type: ignore[dict-item]
            "desirable": torch.tensor([e.desirable for e in examples]),
            "num_tokens": sum(map(len, examples))}


class KTOObjective:
    metric_names = ("chosen_logp", "rejected_logp", "kl")
    rows_per_unit = 1
    graphable = False                      # micro-batches change shape: no CUDA graphs

    def __init__(self, *, pad_id: int, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 micro_batch_size: int = 1) -> None:
        self.pad_id, self.beta = pad_id, beta
        self.weights = desirable_weight, undesirable_weight
        self.micro_batch_size = micro_batch_size

    def sampling(self, micro_batch_size: int, accumulation: int) -> tuple[int, int]:
        return accumulation, micro_batch_size

    def micro_batches(self, runner: Runner, drawn: list[list[KTOExample]], step: int | None) -> list[Batch]:
        """Collated micro-batches carrying the step's reference point z0 (one sum over ranks)."""
        batches = [collate_kto(examples, self.pad_id) for examples in drawn if examples]
        kl = torch.zeros(2, dtype=torch.float64, device=runner.device)
        with torch.no_grad():
            for batch in batches:
                rows = batch["kl"]
                policy = sequence_logps(runner.forward(rows).token_logps, rows["labels"])[0]
                ref = sequence_logps(runner.forward(rows, reference=True).token_logps, rows["labels"])[0]
                kl += torch.stack([(policy - ref).double().sum(), torch.tensor(float(len(policy)), device=kl.device)])
        total, count = runner.global_sum(kl).tolist()
        z0 = kto_reference_point(torch.tensor(total, device=runner.device), int(count)).float()
        for batch in batches:
            batch["z0"] = z0
        return batches

    def count(self, batch: Batch) -> int:
        return int(batch["examples"])  # type: ignore[arg-type]

    def tokens(self, batch: Batch) -> int:
        return int(batch["num_tokens"])  # type: ignore[arg-type]

    def loss(self, runner: Runner, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        rows = batch["main"]
        policy, length = sequence_logps(runner.forward(rows).token_logps, rows["labels"])  # type: ignore[index]
        ref, _ = sequence_logps(runner.forward(rows, reference=True).token_logps, rows["labels"])  # type: ignore[index]
        desirable = batch["desirable"].to(runner.device)  # type: ignore[union-attr]
        z0 = batch["z0"]
        losses = kto_loss(policy, ref, desirable, z0, beta=self.beta, desirable_weight=self.weights[0],
                          undesirable_weight=self.weights[1])
        mean = policy / length
        return losses.sum(), {"chosen_logp": metric(mean[desirable]), "rejected_logp": metric(mean[~desirable]),
                              "kl": metric(z0.expand(len(policy)))}  # type: ignore[union-attr]

    def evaluate(self, runner: Runner, units: Sequence[KTOExample]) -> dict[str, float]:
        return evaluate_by_loss(runner, self, units, self.micro_batch_size)
