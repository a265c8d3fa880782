"""What every loader hands to the model builder: a config and a stream of named tensors.

Loaders (Hugging Face folder, GGUF file, Hub id) differ only in how they read; they all yield
tensors under Hugging Face's parameter names (`model.layers.0.self_attn.q_proj.weight`, ...),
one at a time, so the builder can place each into the model and drop it before the next one
is read: peak host memory stays near one copy of the model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from velotune.models.config import ModelConfig

if TYPE_CHECKING:
    from velotune.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: ModelConfig
    # Called once by the builder; yields (hf_name, tensor) pairs one at a time.
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Tokenizer | None
    source: str                                   # file or folder, for error messages
    generation_config: dict[str, Any] = field(default_factory=dict)
    # A `*-bnb-4bit` checkpoint: each 4-bit weight name -> the names of all its tensors (packed
    # codes, absmax, tables, state JSON), from the file headers. Empty for 16-bit checkpoints.
    prequantized: dict[str, frozenset[str]] = field(default_factory=dict)
