"""Rows for new tokens: the input embedding (and an untied output head) grown to hold new token ids,
each new row starting at the mean of the rows trained before.

Why the mean: a random row is a token the model has never seen, with logits and hidden states
far from anything it knows, which the first steps then spend pulling back; the mean row is a
bland average token (Hewitt 2021, which transformers adopts as `mean_resizing`, adding noise from
the rows' covariance; we leave the noise out so a run is reproducible from its seed alone).
Token ids the tokenizer places inside the existing matrix (vocabularies padded to a round size)
get the mean row too: what was there was never trained.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _grown(weight: torch.Tensor, size: int, rows: Sequence[int]) -> nn.Parameter:
    """`weight` with `size` rows, `rows` set to the mean of the old rows (excluding `rows`)."""
    old = weight.detach()
    kept = torch.ones(old.shape[0], dtype=torch.bool, device=old.device)
    kept[[r for r in rows if r < old.shape[0]]] = False
    mean = old[kept].float().mean(dim=0).to(old.dtype)
    new = torch.empty(size, old.shape[1], dtype=old.dtype, device=old.device)
    new[:old.shape[0]] = old
    new[list(rows)] = mean
    return nn.Parameter(new, requires_grad=weight.requires_grad)


def add_token_rows(model: nn.Module, token_ids: Sequence[int]) -> None:
    """Grow `model`'s vocabulary to hold `token_ids` and start their rows at the mean row (in place;
    call before the optimizer and LoRA are set up, since the embedding parameter is replaced)."""
    config = model.config
    size = max(config.vocab_size, max(token_ids) + 1)
    rows = sorted(set(token_ids) | set(range(config.vocab_size, size)))
    embed = model.model.embed_tokens
    embed.weight = _grown(embed.weight, size, rows)
    embed.num_embeddings = size
    if config.tie_word_embeddings:
        model.lm_head.weight = embed.weight
    else:
        model.lm_head.weight = _grown(model.lm_head.weight, size, rows)
    model.lm_head.out_features = size
    config.vocab_size = size
