"""GaLore (Zhao et al., 2024): full fine-tuning with Adam moments kept in a low-rank subspace.

For a projected weight W [m, n] with gradient G, every `update_proj_gap` steps the top-`rank`
singular vectors of G become the projector P, taken on the smaller side: P = V_r [n, r] when
m >= n (low-rank gradient G P, [m, r]) and P = U_r [m, r] otherwise (P^T G, [r, n]). Adam runs on
the low-rank gradient; its normalised update is projected back (times P^T, or P times) and scaled
by `scale`. The moments therefore take r·max(m, n) numbers instead of 2·m·n. Everything else
(vectors, embeddings, the head, groups without a rank) is plain AdamW.

Design choices:
- Adam's arithmetic is torch.optim.AdamW's (bias-corrected second moment inside the square root,
  eps outside, decoupled weight decay applied to the full weight first), so a group whose rank is
  at least min(m, n) (nothing to compress: the projector is the identity, no SVD) with scale 1 is
  step for step torch's AdamW.
- Moments are kept when the projector changes, as in the paper's reference implementation.
- All state lives in `self.state` as tensors: the step (a float32 scalar, as torch keeps it),
  and the moments and projector in the parameter's dtype and device, so `state_dict()` and
  `load_state_dict()` round-trip it exactly (torch casts loaded state, the step excepted, to the
  parameter's dtype). The SVD itself runs in float32.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from velotune.train.config import TrainConfig

# The weights GaLore projects when building from a model: the decoder's linear layers.
PROJECTED_SUFFIXES = tuple(f"{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"))


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW; parameter groups with an integer `rank` project their 2-D gradients (see module doc)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None,
                 update_proj_gap: int = 200, scale: float = 0.25) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"GaLoreAdamW: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"GaLoreAdamW: betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)
        for group in self.param_groups:
            rank, gap = group["rank"], group["update_proj_gap"]
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
                raise ValueError(f"GaLoreAdamW: rank must be a positive integer or None, got {rank!r}")
            if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
                raise ValueError(f"GaLoreAdamW: update_proj_gap must be a positive integer, got {gap!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.update(param, group)
        return loss

    def update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        state = self.state[param]
        beta1, beta2 = group["betas"]
        lr, rank = group["lr"], group["rank"]
        projected = rank is not None and param.ndim == 2 and rank < min(param.shape)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        step = int(state["step"].item())
        if projected:
            if step % group["update_proj_gap"] == 0:
                state["projector"] = projector(grad, rank).to(param.dtype)
            grad = project(grad, state["projector"])
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        step += 1
        state["step"].fill_(step)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        if group["weight_decay"]:
            param.mul_(1 - lr * group["weight_decay"])
        if projected:
            direction = project_back(exp_avg / denom, state["projector"], param.shape)
            param.add_(direction, alpha=-lr * group["scale"] / bias_correction1)
        elif rank is not None and param.ndim == 2:
            param.addcdiv_(exp_avg, denom, value=-lr * group["scale"] / bias_correction1)
        else:
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` singular vectors of `grad` on its smaller side: V_r [n, r] if m >= n, else U_r [m, r]."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    m, n = grad.shape
    return vh[:rank].t().contiguous() if m >= n else u[:, :rank].contiguous()


def project(grad: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    m, n = grad.shape
    return grad @ proj if m >= n else proj.t() @ grad


def project_back(low: torch.Tensor, proj: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    m, n = shape
    return low @ proj.t() if m >= n else proj @ low


def build_galore(model: nn.Module, groups: list[dict[str, Any]], config: TrainConfig) -> GaLoreAdamW:
    """The trainer's optimizer for `optimizer: galore`: the decoder's projection weights get
    rank `galore_rank`, the rest of each group (embeddings, head, norms) plain AdamW."""
    names = {id(p): name for name, p in model.named_parameters()}
    galore_groups: list[dict[str, Any]] = []
    for group in groups:
        projected = [p for p in group["params"] if p.ndim == 2 and names.get(id(p), "").endswith(PROJECTED_SUFFIXES)]
        chosen = {id(p) for p in projected}
        rest = [p for p in group["params"] if id(p) not in chosen]
        if projected:
            galore_groups.append({**group, "params": projected, "rank": config.galore_rank,
                                  "update_proj_gap": config.galore_update_proj_gap, "scale": config.galore_scale})
        if rest:
            galore_groups.append({**group, "params": rest, "rank": None})
    return GaLoreAdamW(galore_groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                       eps=config.adam_epsilon)
