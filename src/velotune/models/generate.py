"""Generation for checking the model: greedy or sampled decoding with a KV cache and stop tokens.

Prompts of different lengths are left-padded (attention_mask marks real tokens); positions
count real tokens only, as the checkpoints were trained. The fast batched engine for serving and
RL lives in `velotune.infer`; this is the simple, obviously-correct loop.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from velotune.models.cache import KVCache

if TYPE_CHECKING:
    from velotune.models.transformer import Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p   # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model: Transformer,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    *,
    attention_mask: torch.Tensor | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Iterable[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Returns [B, prompt + generated] ids; rows that stopped early are filled with `pad_token_id`."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    if stop_token_ids is None:
        eos = model.config.eos_token_id
        stop_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(stops[0]) if len(stops) else 0
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    param = next(model.parameters())
    cache = KVCache(model.config, b, t + max_new_tokens, param.dtype, input_ids.device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    try:
        hidden = model.hidden_states(input_ids, attention_mask, positions, cache)
        out = [input_ids]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        next_pos = positions[:, -1:] + 1
        for _ in range(max_new_tokens):
            logits = model.logits_from_hidden(hidden[:, -1])
            token = sample_next(logits, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            out.append(token[:, None])
            done = done | torch.isin(token, stops)
            if bool(done.all()) or cache.length >= cache.max_length:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)[:, None]], dim=1)
            hidden = model.hidden_states(token[:, None], attention_mask, next_pos, cache)
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
