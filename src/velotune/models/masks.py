"""Attention masks: causal, padding, packed documents and sliding windows in one boolean mask,
or packed documents as spans for variable-length attention.

`None` means "plain causal" so attention can take its fastest path; an explicit mask is only
built when padding, packing, a sliding window or a cache offset makes it necessary. Packed
documents in a model whose attention has no soft-cap travel as `DocumentSpans` instead: their
start offsets, which `kernels.varlen_attention` turns into one causal triangle per document
(flash's variable-length kernel on a GPU) instead of a [tokens x tokens] mask.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
    blocks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean [B|1, 1, t, offset+t] mask (True = may attend) for t queries after `offset`
    cached tokens; `attention_mask` [B, offset+t] marks real (1) vs padding (0) tokens.
    `blocks` [B, offset+t] (`image_blocks`): tokens of one image block also see its later tokens,
    the window still applying (Gemma 3's images, as transformers masks them)."""
    s = offset + t
    # Inside a capture (a padded batch of a user's loop, models/loop_graphs.py) the mask is kept:
    # the test waits for the GPU, and the graph replays whatever mask later batches bring.
    if attention_mask is not None and not capturing(attention_mask) and bool(attention_mask[:, :s].all()):
        attention_mask = None
    windowed = window is not None and s > window
    if attention_mask is None and docs is None and blocks is None and not windowed and (t == s or t == 1):
        return None
    q = torch.arange(offset, s, device=device)[:, None]
    kv = torch.arange(s, device=device)[None, :]
    allowed = kv <= q
    if blocks is not None:
        mine = blocks[:, offset:s, None]
        allowed = allowed[None] | ((mine == blocks[:, None, :s]) & (mine >= 0))
        allowed = allowed[:, None]
    if windowed:
        allowed = allowed & (q - kv < window)
    if blocks is None:
        allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :s].bool()
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    # A token may always see itself, so padding rows never have an empty softmax (NaN).
    return allowed | (kv == q)[None, None]


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """[B, T] number of the run of image tokens each token belongs to (counted per row from 0),
    -1 for other tokens: an image's tokens form one run."""
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~previous
    return torch.where(is_image, torch.cumsum(starts.int(), dim=1) - 1, -1)


@dataclass(frozen=True)
class DocumentSpans:
    """Packed documents of a batch, flattened over (row, token): document j holds the tokens
    cu_seqlens[j] <= i < cu_seqlens[j + 1] of the B*T, and cu_seqlens[-1] == B*T. `max_len` bounds
    the longest document (a host integer: a CUDA graph fixes it per shape); empty documents (a
    repeated offset) fill the unused slots of a fixed-size `cu_seqlens`. `window` is the sliding
    window of the layers that receive these spans (None: full causal)."""

    cu_seqlens: torch.Tensor
    max_len: int
    window: int | None = None

    def windowed(self, window: int | None) -> DocumentSpans:
        return self if window == self.window else dataclasses.replace(self, window=window)


def spans_from_positions(position_ids: torch.Tensor) -> DocumentSpans | None:
    """The documents of caller-given position ids (a new one wherever a position does not follow
    on from the previous, and at every row start), or None when every row holds one document.
    Waits for the GPU (counts and the longest length are host numbers): never inside a capture,
    where the collated batch brings its spans (train/graphed_step.py)."""
    b, t = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    offsets = torch.cat([starts.flatten().nonzero().flatten(),
                         torch.tensor([b * t], device=position_ids.device)])
    return DocumentSpans(offsets.to(torch.int32), int(offsets.diff().max()))


Mask = torch.Tensor | DocumentSpans | None
"""What a decoder layer's attention receives: None (plain causal), a boolean mask, or spans."""
