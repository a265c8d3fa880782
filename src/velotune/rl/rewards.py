"""Reward functions for GRPO, and the checks that make a user's reward function fail clearly.

A reward function takes `(prompts, completions, **columns)` (lists of equal length; columns are
the dataset's other fields, e.g. `answer`) and returns one float per completion. Config files
name them as `module:function`.
"""
from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

RewardFn = Callable[..., Sequence[float]]

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


class RewardError(ValueError):
    """A reward function that raised or returned something unusable (names the function)."""


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def exact_numeric_answer(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any], **_: Any) -> list[float]:
    """1.0 when the last number in the completion equals the row's `answer`, else 0.0."""
    out = []
    for completion, expected in zip(completions, answer):
        got = last_number(completion)
        out.append(1.0 if got is not None and math.isclose(got, float(expected), abs_tol=1e-6) else 0.0)
    return out


def required_format(pattern: str) -> RewardFn:
    """A reward of 1.0 for completions matching `pattern` (regex, searched), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
        return [1.0 if compiled.search(c) else 0.0 for c in completions]

    reward.__name__ = f"required_format({pattern!r})"
    return reward


def resolve(spec: str | RewardFn) -> RewardFn:
    """A callable, or 'module:function' imported."""
    if callable(spec):
        return spec
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {module_name} has no function {attr!r}")
    return fn


def score(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, Sequence[Any]]) -> list[float]:
    """Call one reward function and check what it returns."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        values = list(fn(list(prompts), list(completions), **columns))
    except Exception as exc:
        raise RewardError(f"reward function {name} raised {type(exc).__name__}: {exc}") from exc
    if len(values) != len(completions):
        raise RewardError(f"reward function {name} returned {len(values)} values for {len(completions)} completions")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardError(f"reward function {name} returned non-numbers: {values[:3]!r}") from None
    if any(math.isnan(v) for v in values):
        raise RewardError(f"reward function {name} returned NaN")
    return values
