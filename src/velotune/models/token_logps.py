"""Per-token log-probabilities without the [tokens x vocab] tensor, for the preference and RL
objectives (`Transformer.forward(..., return_token_logps=True)`), which need each sequence's
log-probability rather than one summed loss.

Tokens go through the output head a chunk at a time; each chunk's logits live only inside a
checkpointed function, so the backward recomputes them chunk by chunk instead of keeping them.
Peak extra memory is one [chunk x vocab] block whatever the sequence length.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = hidden @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax statistics in at least float32
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                softcap: float | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for hidden [N, H], output weight [V, H], targets [N]."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_chunk_logps, h, weight, t, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(h, weight, t, softcap))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
