"""Helpers for the trainer tests: tiny random Llama / Qwen2 models saved as Hugging Face
folders (built by transformers, loaded by velotune) and synthetic chat-like examples."""
from __future__ import annotations

import random

import pytest
import torch

import velotune
from velotune.data import IGNORE_INDEX, Example

transformers = pytest.importorskip("transformers")

VOCAB = 97
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
            initializer_range=0.2)   # large enough that logits can move far from uniform
FAMILIES = {"llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
            "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False))}


def save_tiny(family: str, folder, seed: int = 0):
    """A random tiny model of `family` written to `folder`; returns the transformers model."""
    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    model.save_pretrained(folder)
    return model


def load_tiny(folder):
    model, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    return model


def make_examples(n: int, seed: int = 0, min_len: int = 6, max_len: int = 20) -> list[Example]:
    """A random prompt (not trained), then an answer (trained) that counts up from the prompt's
    last token: learnable, so losses fall within a few steps. Lengths vary."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        prompt = rng.randint(2, length - 2)
        ids = [rng.randrange(3, VOCAB) for _ in range(prompt)]
        while len(ids) < length:
            ids.append(3 + (ids[-1] - 2) % (VOCAB - 3))
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append(Example(ids, labels, f"synthetic {i}"))
    return examples
