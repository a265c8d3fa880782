"""GRPO: sample a group of completions per prompt with the generation engine, score them, and
push the policy toward the better ones.

One `grpo_step`:
1. render each prompt with the chat template; the engine samples `num_generations` completions
   per prompt from the training model itself (adapters on, no second copy of the weights);
2. every reward function scores every completion; the rewards are summed per completion and
   normalised within each prompt's group into advantages;
3. per-token log-probabilities of the completions are computed under the policy and under the
   reference (the same model with adapters switched off), chunked over tokens so the
   [tokens x vocab] logits never exist;
4. the clipped objective with the KL term (`losses.grpo_token_loss`) is summed over all
   completion tokens of the step and divided by their count, over micro-batches: exact under
   accumulation. With one optimisation pass per generation the sampling policy is the current
   one, so the ratio is 1 in value but carries the policy gradient.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from velotune.infer.engine import Completion, generate
from velotune.infer.sampling import SamplingParams
from velotune.lora import disable_adapters
from velotune.rl.logprobs import sequence_token_logps
from velotune.rl.losses import group_advantages, grpo_token_loss
from velotune.rl.rewards import RewardFn, score


@dataclass
class GRPOSettings:
    num_generations: int = 8
    max_completion_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04
    clip_eps: float = 0.2
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class GRPOStepResult:
    loss: float
    mean_reward: float
    rewards: list[float]
    completions: list[Completion]


def completion_batch(completions: Sequence[Completion], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows; labels on the completion tokens only."""
    width = max(len(c.prompt_ids) + len(c.token_ids) for c in completions)
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(completions):
        p, n = len(c.prompt_ids), len(c.prompt_ids) + len(c.token_ids)
        ids[i, :n] = torch.tensor(c.prompt_ids + c.token_ids)
        labels[i, p:n] = torch.tensor(c.token_ids)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def grpo_step(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], reward_fns: Sequence[RewardFn],
              optimizer: torch.optim.Optimizer, settings: GRPOSettings, *, step: int = 0,
              prompt_key: str = "prompt") -> GRPOStepResult:
    device = next(model.parameters()).device
    g = settings.num_generations
    prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": r[prompt_key]}],
                                                add_generation_prompt=True) for r in rows]
    params = SamplingParams(max_new_tokens=settings.max_completion_length, temperature=settings.temperature,
                            top_p=settings.top_p, seed=settings.seed * 1_000_003 + step)
    completions = generate(model, tokenizer, [p for p in prompt_ids for _ in range(g)], params)
    prompts = [r[prompt_key] for r in rows for _ in range(g)]
    texts = [c.text for c in completions]
    columns = {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != prompt_key}
    rewards = torch.zeros(len(completions))
    for fn in reward_fns:
        rewards += torch.tensor(score(fn, prompts, texts, columns))
    advantages = group_advantages(rewards, g).to(device)

    batch = completion_batch(completions, tokenizer.pad_token_id or 0, device)
    total_tokens = int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    loss_value = 0.0
    for start in range(0, len(completions), settings.micro_batch_size):
        part = {k: v[start:start + settings.micro_batch_size] for k, v in batch.items()}
        mask = (part["labels"][:, 1:] != -100).float()
        with torch.no_grad(), disable_adapters(model):
            ref = sequence_token_logps(model, part["input_ids"], part["labels"], part["attention_mask"]) \
                if settings.beta else None
        logp = sequence_token_logps(model, part["input_ids"], part["labels"], part["attention_mask"])
        per_token = grpo_token_loss(logp, logp.detach(), ref, advantages[start:start + settings.micro_batch_size],
                                    clip_eps=settings.clip_eps, beta=settings.beta)
        loss = (per_token * mask).sum() / max(total_tokens, 1)
        loss.backward()
        loss_value += loss.item()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return GRPOStepResult(loss_value, float(rewards.mean()), rewards.tolist(), completions)
