"""The experts of a mixture-of-experts layer in plain PyTorch: the CPU path and the oracle of the
grouped Triton kernels (`kernels/ops/moe.py`).

Each token's k (expert, weight) choices become k rows; rows are sorted by expert (stable, so a
token's rows keep their order), each expert's rows go through its GLU MLP as one matmul per
projection, the outputs are scaled by their routing weights and added back to their tokens in
expert order (the order transformers' per-expert loop adds them in). Autograd differentiates it.

Expert weights are stacked [E, out, in] like linear weights: gate_up [E, 2I, H] (gate rows, then
up rows), down [E, H, I]; optional biases [E, 2I] and [E, H]. Per-expert LoRA adapters (`lora`)
add s (X A_e^T) B_e^T to either projection.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MOE_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "swiglu_clamped")
# gpt-oss's clamped SwiGLU: out = (clamp(up, -L, L) + 1) * g' * sigmoid(ALPHA g'), g' = min(gate, L).
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


@dataclass(frozen=True)
class ExpertAdapters:
    """Per-expert LoRA of one projection: a [E, r, in], b [E, out, r], scale s."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Experts:
    """What the experts compute with. 4-bit experts give `dequantize` instead of the weights: it
    returns (gate_up, down) and is called again in the backward, so no layer keeps them."""

    gate_up: torch.Tensor | None             # [E, 2I, H]
    down: torch.Tensor | None                # [E, H, I]
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    gate_up_lora: ExpertAdapters | None = None
    down_lora: ExpertAdapters | None = None
    activation: str = "silu"
    dequantize: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dequantize is not None:
            return self.dequantize()
        return self.gate_up, self.down

    @property
    def num_experts(self) -> int:
        return (self.gate_up if self.gate_up is not None else self.weights()[0]).shape[0]


def expert_glu(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up from the [rows, 2I] gate|up halves."""
    g, u = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(g) * u
    if activation == "gelu_pytorch_tanh":
        return F.gelu(g, approximate="tanh") * u
    if activation == "swiglu_clamped":
        g = g.clamp(max=SWIGLU_LIMIT)
        return (u.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT) + 1) * (g * torch.sigmoid(g * SWIGLU_ALPHA))
    raise ValueError(f"experts: unknown activation {activation!r}, expected one of {MOE_ACTIVATIONS}")


def routing_order(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): `order` lists the flattened [N*k] choices sorted by expert (stable);
    `counts` [E] how many rows each expert gets."""
    flat = expert_ids.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts)


def _project(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             lora: ExpertAdapters | None, e: int) -> torch.Tensor:
    out = F.linear(rows, weight[e], None if bias is None else bias[e])
    if lora is not None:
        out = out + lora.scale * F.linear(F.linear(rows, lora.a[e].to(rows.dtype)), lora.b[e].to(rows.dtype))
    return out


def moe_experts_reference(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                          experts: Experts) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for x [N, H], ids and weights [N, k]."""
    n, k = expert_ids.shape
    gate_up, down = experts.weights()
    order, counts = routing_order(expert_ids, gate_up.shape[0])
    token = order // k
    rows = x[token]
    outs = []
    for e, chunk in enumerate(rows.split(counts.tolist())):
        if chunk.shape[0] == 0:
            continue
        h = expert_glu(_project(chunk, gate_up, experts.gate_up_bias, experts.gate_up_lora, e), experts.activation)
        outs.append(_project(h, down, experts.down_bias, experts.down_lora, e))
    if not outs:
        return x.new_zeros(n, x.shape[-1]) + 0 * gate_up.sum()
    out = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)
    return x.new_zeros(n, x.shape[-1]).index_add(0, token, out)
