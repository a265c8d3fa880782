"""What a mixture-of-experts layer (Qwen3-MoE, gpt-oss) adds to the memory estimate
(`velotune.estimate`): its parameters and adapters, what its router and grouped-expert kernels
(`kernels/ops/moe.py`) keep for the backward, and what their backward makes.

T tokens, each routed to k of E experts (R = T x k routed rows), h hidden, I the experts'
intermediate size, r the LoRA rank. Per-expert LoRA (the default targets name the MLP
projections, which on these layers mean the experts) adds A [E, r, in] and B [E, out, r] to
both stacked weights: E r (2h + 3I) values a layer. 4-bit experts are two NF4 matrices,
[E * 2I, h] and [E * h, I], dequantized whole in the layer's forward and again in its backward.

Kept for the backward, besides the MLP input the dense formula already counts:

    2 B x 2I x k            gate|up of every routed row (`gu`; act(gate) * up is remade from it)
    (2 + 4) B x k           the routing weights, and their float32 copy in row order
    8 B x k                 the chosen experts' ids (topk keeps them)
    (8 + 4 + 8 + 8) B x k   each sorted row's choice, token, inverse and expert (the route plan,
                            a ctx attribute, so a checkpointed layer keeps it too)
    4 B x (ceil(Tk / 64) + min(E, Tk) + 2E + 1)   the plan's tile tables (64-row tiles on a GPU)
    Qwen3-MoE: 4 B x E      the router's float32 probabilities (softmax before top-k keeps them)
               4 B x (k + 1) the top-k probabilities and their sum, when renormalised
    LoRA: 2 B x 2r x k      X A^T and h A^T of every routed row

gpt-oss takes the softmax over its k top logits, so its routing weights are that softmax's
output and nothing else is kept. The load-balancing loss (`router_aux_loss_coef` > 0) adds the
float32 probabilities of every layer, 4 B x E, which is not counted.

The backward of the experts (`MoEExperts.backward`) peaks at one of these moments, on top of
what the layer keeps and the gradient of its output (LoRA's small [R, r] terms included):

    the routing weights' gradient   h, dh and three float32 [R, I] products   16 B x kI
    the row-scaled output gradient  h, dh, a float32 copy and its product     4 B x kI + 8 B x kH
    the row-scaled dh               h, dh, its float32 copy and product, the scaled output
                                    gradient (kept to the end)                12 B x kI + 2 B x kH
    the input gradient              dgu, the scaled output gradient, dx rows, their gather, dx
                                                                              4 B x kI + 6 B x kH + 2 B x h

and QLoRA holds both dequantized expert weights meanwhile. These are measured against what the
CPU allocates (tests/test_estimate_saved_bytes.py, through the interpreted kernels).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from velotune.memory_terms import BF16, F32, I32, I64, Term

if TYPE_CHECKING:   # config fields only: the estimator sits below models/ (see estimate.py)
    from velotune.models.config import ModelConfig

TILE_ROWS = 64   # the grouped kernels' row tile on a GPU (kernels/ops/moe.py `_block_m`)


def moe_layers(config: ModelConfig) -> int:
    return sum(config.is_moe(i) for i in range(config.num_hidden_layers))


def expert_matrices(config: ModelConfig) -> list[int]:
    """Element counts of one layer's stacked expert weights: gate|up [E, 2I, h] and down [E, h, I]."""
    e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
    return [e * 2 * i * h, e * h * i]


def expert_adapter_tensors(config: ModelConfig, r: int) -> list[int]:
    """Element counts of one layer's per-expert adapters: A and B of gate|up, A and B of down."""
    e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
    return [e * r * h, e * 2 * i * r, e * r * i, e * h * r]


def dequantized_experts_bytes(config: ModelConfig) -> int:
    """4-bit experts dequantized for a layer's forward or backward: both stacked weights, bf16."""
    return BF16 * sum(expert_matrices(config))


def saved_terms(config: ModelConfig, method: str, tokens: int, r: int) -> list[Term]:
    """What an MoE layer's router and experts keep for the backward (see the module docstring)."""
    k, e = config.num_experts_per_tok, config.num_experts
    terms = [
        Term("routed gate|up rows: 2 B x 2I x k", BF16 * 2 * config.moe_intermediate_size * k),
        Term("routing weights and their f32 copy per row: (2 + 4) B x k", (BF16 + F32) * k),
        Term("chosen experts' ids, kept by topk: 8 B x k", I64 * k),
        *plan_terms(config, tokens),
    ]
    if not config.router_softmax_after_topk:
        terms.append(Term("router probabilities, f32: 4 B x E", F32 * e))
        if config.norm_topk_prob:
            terms.append(Term("top-k probabilities and their sum, f32: 4 B x (k + 1)", F32 * (k + 1)))
    if method != "full":
        terms.append(Term("X A^T and h A^T of the routed rows: 2 B x 2r x k", BF16 * 2 * r * k))
    return terms


def plan_terms(config: ModelConfig, tokens: int) -> list[Term]:
    """The route plan, which the experts' autograd Function keeps as a ctx attribute: a
    checkpointed layer keeps it as well."""
    k, e = config.num_experts_per_tok, config.num_experts
    rows = tokens * k
    tiles = -(-rows // TILE_ROWS) + min(e, rows) + 2 * e + 1
    return [Term("sorted rows' choice, token, inverse, expert: (8 + 4 + 8 + 8) B x k", (3 * I64 + I32) * k),
            Term("route plan tile tables, int32: ceil(Tk / 64) + min(E, Tk) + 2E + 1", 0, I32 * tiles)]


def backward_terms(config: ModelConfig, method: str, r: int) -> list[Term]:
    """What the experts' backward adds at its peak (see the module docstring); QLoRA's
    dequantized weights are counted by the caller."""
    k, h, i = config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
    rank_rows = BF16 * r * k if method != "full" else 0      # one [R, r] gradient of the adapters' path
    moments = {
        "routing weights' gradient: 16 B x kI": 16 * k * i + rank_rows,
        "row-scaled output gradient: 4 B x kI + 8 B x kH": 4 * k * i + 8 * k * h + rank_rows,
        "row-scaled dh: 12 B x kI + 2 B x kH": 12 * k * i + 2 * k * h + rank_rows,
        "input gradient: 4 B x kI + 6 B x kH + 2 B x h": 4 * k * i + 6 * k * h + 2 * h + 2 * rank_rows,
    }
    what = max(moments, key=moments.__getitem__)
    return [Term(f"the experts' backward at its peak, {what}", moments[what])]
