"""Sampling: turn last-position logits into next tokens.

Order of the processors follows common practice: repetition penalty on raw logits, then
temperature, then top-k, top-p and min-p filters, then a draw. Temperature 0 is greedy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DECODE_MODES = ("auto", "graph", "static", "dynamic")


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None   # None: the tokenizer's / model's stop tokens
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    # One seed per prompt row instead: each row draws from its own generator, so a row's
    # completion does not depend on which other rows share its batch (GRPO splits a step's prompts
    # over ranks and must sample what one process would). Costs one draw call per row and token.
    row_seeds: list[int] | None = None
    # How decode steps run (see velotune.infer.static): "auto" = CUDA graphs on CUDA (eager if
    # capture fails), the static step eagerly elsewhere; "graph" = CUDA graphs or an error;
    # "static" = the static step without graphs; "dynamic" = a Python-int cache offset and
    # attention over exactly the columns written so far (host-built masks; the reference the
    # static step is tested against).
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}; got {self.decode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens already in each row (`seen` [B, V]
    boolean), the usual CTRL-style penalty."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled float32 logits with -inf outside the kept set."""
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if p.min_p:
        probs = logits.softmax(-1)
        floor = p.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; `generator` is one generator, or one
    per row."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, p).softmax(-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(row[None], 1, generator=g)[0] for row, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
