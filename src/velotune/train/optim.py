"""The optimizer of a run: AdamW (fused CUDA kernel when every parameter is on a GPU) or GaLore.

Weight decay applies to matrices only; vectors (norm weights, biases, DoRA magnitudes) are not
decayed, the usual choice since shrinking a norm's scale towards zero is not regularisation.
"""
from __future__ import annotations

import torch
from torch import nn

from velotune.train.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    seen: set[int] = set()
    matrices, vectors = [], []
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            (matrices if param.ndim >= 2 else vectors).append(param)
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "galore":
        from velotune.train.galore import build_galore

        return build_galore(model, groups, config)
    on_gpu = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, eps=config.adam_epsilon,
                             fused=True if on_gpu else None)
