"""Preference and policy-gradient losses: DPO (sigmoid, IPO), ORPO, GRPO.

Formulas follow TRL's published definitions so results are comparable:
- DPO sigmoid: with h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)) over summed sequence
  log-probs, loss = -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (eps: label smoothing).
- IPO: the same h over length-averaged log-probs, loss = (h - 1/(2 beta))^2.
- ORPO: with average log-probs a_c, a_r, log-odds = (a_c - a_r) - (log(1-e^a_c) - log(1-e^a_r)),
  loss = NLL(chosen) - beta log sigmoid(log-odds). No reference model.
- GRPO, per completion token: -min(rho A, clip(rho, 1-e, 1+e) A) + beta KL, where rho is the ratio
  to the sampling policy, A the group-normalised advantage, and KL the k3 estimator
  exp(ref - logp) - (ref - logp) - 1 against the adapter-free reference. The trainer sums it over
  the completion tokens of a whole optimizer step and divides by their count (exact under
  accumulation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLoss:
    losses: torch.Tensor            # per pair
    chosen_rewards: torch.Tensor    # beta * (policy - reference) for logging
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> PreferenceLoss:
    """Per-pair DPO losses from sequence log-probs (summed for sigmoid, length-averaged for IPO:
    the caller passes what the loss type needs, see `sequence_logps`)."""
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
    """(loss, log-odds ratio term per pair). `chosen_nll` is the chosen responses' mean token NLL."""
    log_odds = (chosen_avg_logp - rejected_avg_logp) - (
        torch.log1p(-torch.exp(chosen_avg_logp)) - torch.log1p(-torch.exp(rejected_avg_logp)))
    ratio = F.logsigmoid(log_odds)
    return chosen_nll - beta * ratio.mean(), ratio


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); rewards are laid out group by group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor, *, clip_eps: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """Per-token GRPO loss [B, T] (unmasked; the caller masks and normalises)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if beta and ref_logp is not None:
        diff = ref_logp - logp
        loss = loss + beta * (torch.exp(diff) - diff - 1)
    return loss
