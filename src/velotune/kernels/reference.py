"""Plain-PyTorch references of every fused operation: the CPU path and the kernels' oracle.

They are written for clarity, not speed or memory: `linear_cross_entropy_reference` materialises
the full [N, V] logits, which the Triton path exists to avoid.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    # Normalise in float32 whatever the input dtype, as the checkpoints' reference code does.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (y * (offset + weight.float())).to(x.dtype)
    return weight * y.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm block's residual add and next norm."""
    new_residual = x + residual
    return rms_norm_reference(new_residual, weight, eps, offset), new_residual


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, keep = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, keep), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_pytorch_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"glu: unknown activation {activation!r}, expected one of {ACTIVATIONS}")


class LowRank(NamedTuple):
    """The LoRA term `scale * xa @ right` [rows, cols] (xa [rows, r], right [r, cols]), handed to
    the GLU kernels, which add it where they read the tensor it belongs to instead of having it
    written into that tensor first (a read and a write of a [tokens, intermediate] tensor saved)."""

    xa: torch.Tensor
    right: torch.Tensor
    scale: float


def with_low_rank(t: torch.Tensor, term: LowRank | None) -> torch.Tensor:
    """t + term, summed in float32 and rounded once to t's dtype (t itself when there is no term)."""
    if term is None:
        return t
    return (t.float() + term.scale * (term.xa.float() @ term.right.float())).to(t.dtype)


def right_products_reference(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], out: torch.Tensor) -> None:
    """out = [s_1 t_1 @ right_1^T | s_2 t_2 @ right_2^T | ...] for (t [rows, cols], right [r, cols],
    s) pairs, side by side in out's columns, summed in float32 and rounded once: the products of
    the GLU backward's outputs that its kernel computes from the tiles it writes."""
    parts = [scale * (t.float() @ right.float().t()) for t, right, scale in pairs]
    out.copy_(torch.cat(parts, dim=1))


def glu_low_rank_reference(gate: torch.Tensor, up: torch.Tensor, activation: str,
                           gate_term: LowRank | None = None, up_term: LowRank | None = None) -> torch.Tensor:
    return glu_reference(with_low_rank(gate, gate_term), with_low_rank(up, up_term), activation)


def glu_backward_inplace_reference(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
                                   gate_term: LowRank | None = None, up_term: LowRank | None = None,
                                   dh_term: LowRank | None = None) -> None:
    """The fused LoRA MLP's GLU backward: with g, u and dh completed by their low-rank terms,
    h = act(g) * u written over dh, d/dg over gate and d/du over up. The gradients come from
    autograd through `glu_reference`, so they are by construction those of the unfused path; the
    copies make the in-place contract the kernel's."""
    full_dh, g_in, u_in = (with_low_rank(t, term) for t, term in ((dh, dh_term), (gate, gate_term), (up, up_term)))
    with torch.enable_grad():
        g, u = g_in.detach().requires_grad_(), u_in.detach().requires_grad_()
        h = glu_reference(g, u, activation)
        dgate, dup = torch.autograd.grad(h, (g, u), full_dh)
    dh.copy_(h.detach())
    gate.copy_(dgate)
    up.copy_(dup)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                   softcap: float | None = None,
                                   ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    # Logits accumulated and kept in float32 (half-precision inputs are upcast), as the kernel does:
    # rounding logits to bf16 would add noise of ~0.4% to every token's loss gradient.
    if hidden.dtype in (torch.float16, torch.bfloat16):
        hidden, weight = hidden.float(), weight.float()
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float, window: int | None = None, causal: bool = True) -> torch.Tensor:
    """Causal attention within each packed document: q [N, Hq, D], k/v [N, Hk, D]; document j is
    the tokens cu_seqlens[j] <= i < cu_seqlens[j + 1] (empty documents allowed, cu_seqlens[-1] == N).
    One SDPA call per document, so memory stays that of the longest document, not [N x N]: the
    CPU path and the oracle of the flash path. Reads the offsets on the host (never in a capture).
    `causal=False`: every token of a segment sees all of it (a vision tower's images and windows)."""
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"varlen_attention: cu_seqlens must run from 0 to the {q.shape[0]} tokens, "
                         f"got {bounds[0]} .. {bounds[-1]}")
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        if end <= start:
            continue
        qd, kd, vd = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
        kd, vd = kd.repeat_interleave(groups, dim=1), vd.repeat_interleave(groups, dim=1)
        mask = None
        if causal and window is not None and end - start > window:
            index = torch.arange(end - start, device=q.device)
            mask = (index[None, :] <= index[:, None]) & (index[:, None] - index[None, :] < window)
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=causal and mask is None, scale=scale)
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces)
