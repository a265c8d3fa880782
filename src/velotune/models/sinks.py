"""Attention with sinks (gpt-oss): each head has a learned logit s_h that joins every softmax's
denominator and attends to nothing, so a head can put weight "nowhere".

    out_i = sum_j softmax([scale * q_i.k_j ..., s_h])_j v_j        (the sink's own term dropped)

How: the sink becomes one extra key, prepended, whose score is s_h for every query of head h and
whose value is zero. Its score must differ per head while keys are shared by a group of query
heads, so the head-specific part goes into the queries: each query gets one more dimension
holding s_h / scale, real keys get 0 there and the sink key 1 (zero elsewhere). Then
scale * q'.k'_sink = s_h and the real scores are unchanged. Queries, keys and values are padded
to a multiple of 8 dimensions (what the fused SDPA kernels want); the value rows of the sink are
zero. Everything stays inside `scaled_dot_product_attention` (its memory-efficient kernel on a GPU,
with the mask shifted one key right) and autograd: the sinks' gradient comes through the
queries' extra dimension. The price is 72 instead of 64 dimensions per head and one key more;
the alternative, explicit attention, would keep a [heads x T x T] score tensor per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D] (the last T keys are the queries' own positions), mask
    None (causal) or boolean [B|1, 1, T, S]; returns [B, H, T, D]."""
    b, heads, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    width = (d + 1 + 7) // 8 * 8
    extra = (sinks.to(q.dtype) / scale).view(1, heads, 1, 1).expand(b, heads, t, 1)
    q2 = torch.cat([q, extra, q.new_zeros(b, heads, t, width - d - 1)], dim=-1)
    sink_key = k.new_zeros(b, kv_heads, 1, width)
    sink_key[..., d] = 1.0
    k2 = torch.cat([sink_key, F.pad(k, (0, width - d))], dim=2)
    v2 = F.pad(v, (0, width - d, 1, 0))
    if mask is None and t > 1:   # causal, aligned to the last keys, with the sink seen by all
        rows = torch.arange(s - t, s, device=q.device)[:, None]
        mask = torch.arange(s, device=q.device)[None, :] <= rows
        mask = mask[None, None]
    if mask is not None:
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], 1), mask], dim=-1)
    groups = heads // kv_heads
    if groups > 1:
        k2, v2 = k2.repeat_interleave(groups, dim=1), v2.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, scale=scale)
    return out[..., :d]
