"""A mixture-of-experts MLP (Qwen3-MoE, gpt-oss): a router picks k of E experts per token, the
chosen experts' GLU MLPs run on it and their outputs are summed with the routing weights.

Parameters, stacked per expert like linear weights: `router.weight` [E, H] (+ `router.bias`),
`experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows), `experts.down_proj` [E, H, I]
(+ `experts.gate_up_proj_bias` [E, 2I], `experts.down_proj_bias` [E, H]). Checkpoints that store
them otherwise (Qwen3-MoE per expert, gpt-oss transposed with gate and up interleaved, MXFP4) are
converted by the loaders (`loaders/expert_tensors.py`) and back by the exporters.

Routing follows the family's config: softmax over all experts then top-k, optionally
renormalised (Qwen3-MoE), or top-k logits then softmax over those k (gpt-oss). The experts run
through `kernels.moe_experts`: grouped Triton GEMMs on a GPU, the PyTorch reference elsewhere.

Load balancing (`router_aux_loss_coef` > 0, training only): transformers' auxiliary loss is
E * sum_e f_e P_e, with f_e the share of (layer, token) choices that went to expert e and P_e the
mean router probability of e, over every layer's tokens of the batch. A product of two batch
means does not add up over micro-batches, so here it is taken per row of the batch (f and P over
that row's real tokens and all MoE layers) and weighted by the row's target count: the trainer's
division by the step's targets then makes k micro-batches of n rows equal one batch of k*n rows,
exactly, and a batch of one row equals transformers' value. `MoE.forward` keeps each layer's
per-row counts and probability sums in `aux_statistics` for `Transformer` to combine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from velotune import kernels
from velotune.kernels.moe_reference import Experts
from velotune.models.checkpointing import recomputing
from velotune.models.config import ModelConfig


class Router(nn.Module):
    """A linear map to one logit per expert. Not an `nn.Linear`, so 4-bit loading never quantizes
    it; its `in_features`/`out_features` let LoRA wrap it when `router` is named."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = config.hidden_size, config.num_experts
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ExpertWeights(nn.Module):
    """The stacked expert parameters; LoRA wraps this module (lora/experts.py), a 4-bit base
    replaces it (quant/experts4bit.py). `computed()` is what the kernels compute with."""

    stacked_experts = True   # what apply_lora recognises (lora/experts.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.zeros(e, h, i))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i)) if config.expert_bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h)) if config.expert_bias else None
        self.activation = config.hidden_act

    def computed(self) -> Experts:
        return Experts(self.gate_up_proj, self.down_proj, self.gate_up_proj_bias, self.down_proj_bias,
                       activation=self.activation)


class MoE(nn.Module):
    whole_sequence = True   # never tiled over the sequence (models/tiled_mlp.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = ExpertWeights(config)
        self.aux_statistics: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.collect_aux = False     # set by Transformer for a training forward with an aux loss

    def route(self, logits: torch.Tensor, probabilities: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(expert ids [N, k], routing weights [N, k], probabilities over all experts [N, E] in
        float32). gpt-oss's routing needs no probabilities over all experts: they are made only
        when asked for (the load-balancing loss), so no [N, E] float32 tensor is kept for nothing."""
        c = self.config
        if c.router_softmax_after_topk:
            top, ids = torch.topk(logits, c.num_experts_per_tok, dim=-1)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32) if probabilities else None
            return ids, torch.softmax(top, dim=-1, dtype=top.dtype), probs
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, ids = torch.topk(probs, c.num_experts_per_tok, dim=-1)
        if c.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return ids, top.to(logits.dtype), probs

    def forward(self, x: torch.Tensor, output_needed: bool = True) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        collect = self.collect_aux and not recomputing()   # a checkpoint's rerun adds nothing twice
        ids, weights, probs = self.route(self.router(flat), probabilities=collect)
        if collect:
            b = x.shape[0] if x.dim() == 3 else 1
            counts = F.one_hot(ids, self.config.num_experts).sum(dim=1).to(probs.dtype)
            self.aux_statistics.append((counts.view(b, -1, self.config.num_experts),
                                        probs.view(b, -1, self.config.num_experts)))
        return kernels.moe_experts(flat, ids, weights, self.experts.computed()).view_as(x)
