"""Attention masks: causal, padding, packed documents and sliding windows in one boolean mask.

`None` means "plain causal" so attention can take its fastest path; an explicit mask is only
built when padding, packing, a sliding window or a cache offset makes it necessary.
"""
from __future__ import annotations

import torch

from velotune.kernels.dispatch import capturing


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Packed-sequence document ids: a new document starts wherever the position does not follow
    on from the previous one. None when every row holds a single document, except inside a CUDA
    graph capture, which cannot test that: there the ids are always built (the graphed step
    passes position ids only for batches it found packed)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not capturing(position_ids) and not bool(starts[:, 1:].any()):
        return None
    return starts.cumsum(dim=1)


def attention_mask_for(
    t: int,
    offset: int,
    attention_mask: torch.Tensor | None,
    docs: torch.Tensor | None,
    window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean [B|1, 1, t, offset+t] mask (True = may attend) for t queries after `offset`
    cached tokens; `attention_mask` [B, offset+t] marks real (1) vs padding (0) tokens."""
    s = offset + t
    if attention_mask is not None and bool(attention_mask[:, :s].all()):
        attention_mask = None
    windowed = window is not None and s > window
    if attention_mask is None and docs is None and not windowed and (t == s or t == 1):
        return None
    q = torch.arange(offset, s, device=device)[:, None]
    kv = torch.arange(s, device=device)[None, :]
    allowed = kv <= q
    if windowed:
        allowed = allowed & (q - kv < window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :s].bool()
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    # A token may always see itself, so padding rows never have an empty softmax (NaN).
    return allowed | (kv == q)[None, None]
