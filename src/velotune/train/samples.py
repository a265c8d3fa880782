"""Answers to a few held-out prompts, generated greedily before and after training, so a user sees
what the fine-tune changed in words as well as in loss."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from velotune.data import ChatSample, Sample
from velotune.infer.engine import generate
from velotune.infer.sampling import SamplingParams

MAX_NEW_TOKENS = 40


@dataclass
class SamplePrompt:
    prompt: str                     # the user's line
    reference: str                  # the dataset's answer
    prompt_ids: list[int]


def sample_prompts(samples: Sequence[Sample], tokenizer, count: int) -> list[SamplePrompt]:
    """The opening exchange (everything before the first answer) of the first `count` conversations
    with distinct questions."""
    prompts: list[SamplePrompt] = []
    for sample in samples:
        if len(prompts) == count:
            break
        if not isinstance(sample, ChatSample):
            continue
        first = next((i for i, m in enumerate(sample.messages) if m["role"] == "assistant"), None)
        if first is None or first == 0 or sample.messages[first - 1]["role"] != "user":
            continue
        if any(p.prompt == sample.messages[first - 1]["content"] for p in prompts):
            continue
        text = tokenizer.apply_chat_template(sample.messages[:first], tokenize=False, add_generation_prompt=True)
        prompts.append(SamplePrompt(sample.messages[first - 1]["content"], sample.messages[first]["content"],
                                    tokenizer.encode(text, add_special_tokens=False)))
    return prompts


def answer(model, tokenizer, prompts: Sequence[SamplePrompt], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers, one line each."""
    if not prompts:
        return []
    completions = generate(model, tokenizer, [p.prompt_ids for p in prompts],
                           SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    return [" ".join(c.text.split()) for c in completions]
