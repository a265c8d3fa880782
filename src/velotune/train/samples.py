"""Answers to a few held-out prompts, generated greedily before and after training, so a user sees
what the fine-tune changed in words as well as in loss. They are printed, put in report.md and
kept as OUTPUT_DIR/samples.json (what `velotune studio` shows)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from velotune.data import ChatSample, Sample
from velotune.infer.engine import generate
from velotune.infer.sampling import SamplingParams

MAX_NEW_TOKENS = 40
SAMPLES_FILE = "samples.json"


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


def write_samples(output_dir: str | Path, prompts: Sequence[str], before: Sequence[str], after: Sequence[str]) -> Path:
    """OUTPUT_DIR/samples.json: [{prompt, before, after}]; before is null for a resumed run (the
    model was already part-trained when it started)."""
    rows = [{"prompt": prompt, "before": before[i] if i < len(before) else None, "after": answer_}
            for i, (prompt, answer_) in enumerate(zip(prompts, after))]
    path = Path(output_dir) / SAMPLES_FILE
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
