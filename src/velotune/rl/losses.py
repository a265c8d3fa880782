"""Preference and policy-gradient losses: DPO (sigmoid, IPO), ORPO, SimPO, KTO, GRPO.

Every function returns per-example (per pair, per completion, or per token) values; the objectives
(rl/preference.py, rl/kto.py, rl/grpo.py) sum them over a micro-batch and the trainer divides by
the count of the whole optimizer step, which makes accumulation and ranks exact.

- DPO sigmoid: with h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)) over summed sequence
  log-probs, loss = -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (eps: label smoothing).
- IPO: the same h over length-averaged log-probs, loss = (h - 1/(2 beta))^2.
- ORPO: with average log-probs a_c, a_r, log-odds = (a_c - a_r) - (log(1-e^a_c) - log(1-e^a_r)),
  loss = NLL(chosen) - beta log sigmoid(log-odds). No reference model.
- SimPO (Meng et al. 2024, eq. 6): loss = -log sigmoid(beta a_c - beta a_r - gamma) over the
  length-averaged log-probs a; no reference model, gamma a target margin.
- KTO (Ethayarajh et al. 2024, eq. 8): with r = log pi(y|x) - log ref(y|x) and the reference
  point z0 (an estimate of KL(pi || ref), held constant), a desirable y costs
  lambda_D (1 - sigmoid(beta (r - z0))) and an undesirable one lambda_U (1 - sigmoid(beta (z0 - r))).
  z0 = max(0, mean of r over mismatched (x, y') pairs of the batch) (`kto_reference_point`).
- GRPO, per completion token: -min(rho A, clip(rho, 1-e, 1+e) A) + beta KL, where rho is the ratio
  to the sampling policy, A the group-normalised advantage, and KL the k3 estimator
  exp(ref - logp) - (ref - logp) - 1 against the adapter-free reference. GSPO (Zheng et al. 2025)
  takes one ratio per completion instead, exp of the mean token log-ratio. `grpo_loss_sum` then
  reduces a micro-batch as the loss type says (see GRPO_LOSS_TYPES).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# How per-token GRPO losses become one number, as (what each completion adds to the sum, what
# the step's sum is divided by):
#   grpo     the mean over its tokens         / completions          (the original paper)
#   dr_grpo  the sum over its tokens           / completions x max_completion_length (Dr. GRPO)
#   dapo     the sum over its tokens           / completion tokens   (DAPO's token-level loss)
#   bnpo     the sum over its tokens           / completion tokens
# Every divisor is counted over the whole optimizer step on every rank. TRL's bnpo divides each
# micro-batch by its own tokens, which changes with how a step is split into micro-batches; here
# the "batch" is the step, so bnpo and dapo agree, and accumulation stays exact for both.
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


@dataclass
class PreferenceLoss:
    losses: torch.Tensor            # per pair
    chosen_rewards: torch.Tensor    # beta * (policy - reference) for logging
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> PreferenceLoss:
    """Per-pair DPO losses from sequence log-probs (summed for sigmoid, length-averaged for IPO:
    the caller passes what the loss type needs)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (sigmoid or ipo)")
    return PreferenceLoss(losses, beta * (policy_chosen - ref_chosen).detach(),
                          beta * (policy_rejected - ref_rejected).detach())


def orpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, chosen_nll: torch.Tensor,
              *, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses, log-odds ratio term per pair). `chosen_nll` is each chosen reply's mean
    token NLL."""
    log_odds = (chosen_avg_logp - rejected_avg_logp) - (
        torch.log1p(-torch.exp(chosen_avg_logp)) - torch.log1p(-torch.exp(rejected_avg_logp)))
    ratio = F.logsigmoid(log_odds)
    return chosen_nll - beta * ratio, ratio


def simpo_loss(chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, *, beta: float,
               gamma: float) -> torch.Tensor:
    """Per-pair SimPO losses from length-averaged log-probs."""
    return -F.logsigmoid(beta * (chosen_avg_logp - rejected_avg_logp) - gamma)


def kto_reference_point(kl_sum: torch.Tensor, count: int) -> torch.Tensor:
    """z0 from the summed log-ratios of `count` mismatched pairs: max(0, mean), no gradient."""
    return (kl_sum.detach() / max(count, 1)).clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, *,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-example KTO losses from summed sequence log-probs; `desirable` is a bool per example."""
    r = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, good, bad)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); rewards are laid out group by group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor, *, clip_eps: float = 0.2, beta: float = 0.04,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token GRPO loss [B, T] (unmasked; the caller masks and reduces). With `mask` [B, T] (the
    completion tokens), the importance ratio is GSPO's, one per completion: exp of its tokens'
    mean log-ratio, broadcast over them."""
    log_ratio = logp - old_logp
    if mask is not None:
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if beta and ref_logp is not None:
        diff = ref_logp - logp
        loss = loss + beta * (torch.exp(diff) - diff - 1)
    return loss


def grpo_loss_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """A micro-batch's share of the step's sum (GRPO_LOSS_TYPES): per-completion token means for
    grpo, plain token sums otherwise."""
    summed = (per_token * mask).sum(-1)
    if loss_type == "grpo":
        return (summed / mask.sum(-1).clamp(min=1)).sum()
    if loss_type in GRPO_LOSS_TYPES:
        return summed.sum()
    raise ValueError(f"unknown GRPO loss_type {loss_type!r} ({', '.join(GRPO_LOSS_TYPES)})")


def grpo_count(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> int:
    """What a micro-batch adds to the step's divisor (GRPO_LOSS_TYPES)."""
    if loss_type == "grpo":
        return mask.shape[0]
    if loss_type == "dr_grpo":
        return mask.shape[0] * max_completion_length
    return int(mask.sum())
