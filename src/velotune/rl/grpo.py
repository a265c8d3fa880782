"""GRPO: sample a group of completions per prompt with the generation engine, score them, and push
the policy toward the better ones. The objective the trainer runs (contract: rl/objective.py).

A step's generation phase (`micro_batches`), on each rank for its share of the step's prompts:
1. the engine samples `num_generations` completions per prompt from the training model itself
   (adapters on, no second copy of the weights). Each completion draws from its own generator,
   seeded by (seed, step, prompt index, completion index): what a completion is does not depend
   on how the step's prompts are split over ranks or batched, and a resumed run samples what the
   interrupted one would have;
2. every reward function scores every completion; the rewards are summed per completion and
   normalised within each prompt's group into advantages (a group never leaves its rank);
3. the completions become micro-batches of `micro_batch_size` rows (prompt + completion, labels on
   the completion).

Each micro-batch's loss (`loss`): per-token log-probabilities under the policy and, with a KL
weight, under the reference (the same model with adapters off), the clipped objective with the KL
term, reduced as `loss_type` says (rl/losses.py, GRPO_LOSS_TYPES), the divisor counted over the
whole step on every rank. `importance_sampling: sequence` takes GSPO's one ratio per completion.
One optimisation pass per generation, so the sampling policy is the current one: the ratio is 1
in value (its clipping never acts, whatever epsilon) but carries the policy gradient.

Evaluation: one greedy completion per held-out prompt, `eval_reward` their mean reward.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from velotune.data.batching import Batch, collate_padded
from velotune.data.files import DataError, Row
from velotune.data.tokenize import IGNORE_INDEX, Example
from velotune.infer.engine import Completion, generate
from velotune.infer.sampling import SamplingParams
from velotune.rl.losses import GRPO_LOSS_TYPES, group_advantages, grpo_count, grpo_loss_sum, grpo_token_loss
from velotune.rl.objective import Metrics, Runner, metric
from velotune.rl.rewards import RewardFn, score

CLIP_EPS = 0.2
IMPORTANCE_SAMPLING = ("token", "sequence")


@dataclass
class PromptExample:
    prompt_ids: list[int]
    row: dict[str, Any]      # the dataset row: its prompt text and the columns rewards read
    index: int               # its place in the dataset (seeds its completions)

    def __len__(self) -> int:
        return len(self.prompt_ids)


def tokenize_prompts(rows: Sequence[Row], tokenizer: Any, *, prompt_column: str, max_prompt_length: int,
                     first_index: int = 0) -> list[PromptExample]:
    """Each row's prompt rendered as a user turn with the generation prompt; a long prompt keeps
    its last `max_prompt_length` tokens."""
    if not rows:
        raise DataError("the GRPO prompt dataset is empty")
    out = []
    for i, row in enumerate(rows):
        prompt = row.data.get(prompt_column)
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{row.where}: missing field {prompt_column!r} (the GRPO prompt column)")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        out.append(PromptExample(list(ids)[-max_prompt_length:], dict(row.data), first_index + i))
    return out


def row_seed(seed: int, step: int, index: int, generation: int) -> int:
    """The sampling seed of one completion."""
    return (((seed * 1_000_003 + step) * 1_000_033 + index) * 1_009 + generation) % 2**63


class GRPOObjective:
    metric_names = ("reward", "completion_tokens")
    rows_per_unit = 1
    graphable = False                      # micro-batches change shape: no CUDA graphs

    def __init__(self, tokenizer: Any, rewards: Sequence[RewardFn], *, prompt_column: str = "prompt",
                 num_generations: int = 8, max_completion_length: int = 128, temperature: float = 1.0,
                 beta: float = 0.04, loss_type: str = "grpo", importance_sampling: str = "token", seed: int = 0,
                 micro_batch_size: int = 8, pad_id: int = 0, generation_batch_size: int = 0) -> None:
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"unknown GRPO loss_type {loss_type!r} ({', '.join(GRPO_LOSS_TYPES)})")
        if importance_sampling not in IMPORTANCE_SAMPLING:
            raise ValueError(f"importance_sampling must be one of {', '.join(IMPORTANCE_SAMPLING)}")
        self.tokenizer, self.rewards, self.prompt_column = tokenizer, list(rewards), prompt_column
        self.group, self.max_new, self.temperature = num_generations, max_completion_length, temperature
        self.beta, self.loss_type, self.sequence_ratio = beta, loss_type, importance_sampling == "sequence"
        self.seed, self.micro_batch_size, self.pad_id = seed, micro_batch_size, pad_id
        self.generation_batch_size = generation_batch_size   # 0: every completion of the step at once

    def sampling(self, micro_batch_size: int, accumulation: int) -> tuple[int, int]:
        """One draw of the step's prompts: micro_batch_size x accumulation completions."""
        return 1, micro_batch_size * accumulation // self.group

    def score(self, prompts: Sequence[PromptExample], completions: Sequence[Completion], repeat: int) -> torch.Tensor:
        """Summed rewards [len(completions)]; completion i answers prompt i // repeat."""
        rows = [p.row for p in prompts for _ in range(repeat)]
        columns = {k: [r.get(k) for r in rows] for k in prompts[0].row if k != self.prompt_column}
        texts = [r[self.prompt_column] for r in rows]
        total = torch.zeros(len(completions), dtype=torch.float64)
        for fn in self.rewards:
            total += torch.tensor(score(fn, texts, [c.text for c in completions], columns), dtype=torch.float64)
        return total

    def micro_batches(self, runner: Runner, drawn: list[list[PromptExample]], step: int | None) -> list[Batch]:
        prompts = [p for units in drawn for p in units]
        if not prompts:
            return []
        seeds = [row_seed(self.seed, step or 0, p.index, g) for p in prompts for g in range(self.group)]
        asked = [p.prompt_ids for p in prompts for _ in range(self.group)]
        # Decoded `generation_batch_size` at a time: the KV cache holds that many rows (one
        # 220,000-token completion of Qwen3-8B takes 30 GiB of it), and each row's seed makes its
        # completion the same whichever batch it is decoded in.
        size = self.generation_batch_size or len(asked)
        completions = []
        for start in range(0, len(asked), size):
            params = SamplingParams(max_new_tokens=self.max_new, temperature=self.temperature,
                                    row_seeds=seeds[start:start + size])
            completions += generate(runner.model, self.tokenizer, asked[start:start + size], params)
        rewards = self.score(prompts, completions, self.group)
        advantages = group_advantages(rewards, self.group).float()
        rows = [Example(c.prompt_ids + c.token_ids, [IGNORE_INDEX] * len(c.prompt_ids) + c.token_ids)
                for c in completions]
        batches = []
        for start in range(0, len(rows), self.micro_batch_size):
            part = slice(start, start + self.micro_batch_size)
            batch = collate_padded(rows[part], self.pad_id)
            batch.update(advantages=advantages[part], rewards=rewards[part], num_tokens=sum(map(len, rows[part])))
            batches.append(batch)
        return batches

    def count(self, batch: Batch) -> int:
        return grpo_count(batch["labels"][:, 1:] != IGNORE_INDEX, self.loss_type, self.max_new)  # type: ignore[index]

    def tokens(self, batch: Batch) -> int:
        return int(batch["num_tokens"])  # type: ignore[arg-type]

    def loss(self, runner: Runner, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).to(runner.device).float()  # type: ignore[index]
        logp = runner.forward(batch).token_logps
        ref = runner.forward(batch, reference=True).token_logps if self.beta else None
        per_token = grpo_token_loss(logp, logp.detach(), ref, batch["advantages"].to(runner.device),  # type: ignore[union-attr]
                                    clip_eps=CLIP_EPS, beta=self.beta, mask=mask if self.sequence_ratio else None)
        return grpo_loss_sum(per_token, mask, self.loss_type), {
            "reward": metric(batch["rewards"]), "completion_tokens": metric(mask.sum(-1))}  # type: ignore[arg-type]

    def evaluate(self, runner: Runner, units: Sequence[PromptExample]) -> dict[str, float]:
        """`eval_reward`: the mean reward of one greedy completion per prompt (each rank its share)."""
        world = runner.world
        mine = list(units)[world.rank::world.world_size]
        total = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(mine), self.micro_batch_size):
            part = mine[start:start + self.micro_batch_size]
            completions = generate(runner.model, self.tokenizer, [p.prompt_ids for p in part],
                                   SamplingParams(max_new_tokens=self.max_new, temperature=0.0))
            total += torch.tensor([float(self.score(part, completions, 1).sum()), len(part)], dtype=torch.float64)
        reward, count = runner.global_sum(total.to(runner.device)).tolist()
        return {"eval_reward": reward / max(count, 1)}
