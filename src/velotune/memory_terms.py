"""One thing kept in memory, as the memory estimator counts it (`velotune.estimate`,
`velotune.estimate_experts`): bytes per token plus bytes that do not grow with the tokens."""
from __future__ import annotations

from dataclasses import dataclass

BF16, F32, I32, I64 = 2, 4, 4, 8


@dataclass(frozen=True)
class Term:
    """`what` names it with its size in symbols; `per_token` bytes for each of the T = batch x
    seq tokens, plus `fixed` bytes that do not scale with T."""

    what: str
    per_token: int
    fixed: int = 0

    def bytes(self, tokens: int) -> int:
        return self.per_token * tokens + self.fixed
