"""One optimizer step of DPO or ORPO over micro-batches of preference pairs.

Each pair contributes one loss term; the step's loss is the sum over its pairs divided by the
number of pairs in the whole step (exact under accumulation). DPO's reference log-probs come from
the same model with adapters switched off, never a second model.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from velotune.lora import disable_adapters
from velotune.rl.logprobs import sequence_token_logps
from velotune.rl.losses import dpo_loss, orpo_loss
from velotune.rl.preference import PreferenceExample, collate_pairs


def reply_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, length-averaged) log-probs of each row's reply."""
    logp = sequence_token_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    count = (batch["labels"][:, 1:] != -100).sum(-1).clamp(min=1)
    total = logp.sum(-1)
    return total, total / count


def pair_losses(model: Any, pairs: Sequence[PreferenceExample], pad_id: int, method: str, *,
                beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """Per-pair losses [P] for `method` "dpo" or "orpo"."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    n = len(pairs)
    total, mean = reply_logps(model, batch)
    if method == "orpo":
        nll = -mean[:n]
        loss, ratio = orpo_loss(mean[:n], mean[n:], nll, beta=beta)
        return nll - beta * ratio
    if method != "dpo":
        raise ValueError(f"unknown preference method {method!r} (dpo or orpo)")
    with torch.no_grad(), disable_adapters(model):
        ref_total, ref_mean = reply_logps(model, batch)
    policy, ref = (mean, ref_mean) if loss_type == "ipo" else (total, ref_total)
    return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=beta, loss_type=loss_type).losses


def preference_step(model: Any, micro_batches: Sequence[Sequence[PreferenceExample]], pad_id: int,
                    optimizer: torch.optim.Optimizer, method: str, *, beta: float = 0.1,
                    loss_type: str = "sigmoid", max_grad_norm: float = 1.0) -> float:
    """Accumulate over `micro_batches`, then one optimizer step; returns the step's mean loss."""
    pairs = sum(len(m) for m in micro_batches)
    value = 0.0
    model.train()
    for micro in micro_batches:
        loss = pair_losses(model, micro, pad_id, method, beta=beta, loss_type=loss_type).sum() / pairs
        loss.backward()
        value += loss.item()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value
