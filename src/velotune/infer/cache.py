"""A preallocated key/value cache: one buffer per layer, filled in place during decoding."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from velotune.models.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_length = max_length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {end} requested")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        """Called once per forward, after every layer has stored its `t` new tokens."""
        self.length += t


class StaticSlot:
    """The cache as one static-shape decode step sees it (the step a CUDA graph captures).

    The column to write is a device tensor ([1], long), not a Python int, so one captured graph
    serves every step: the caller advances the tensor in place between replays. Attention reads
    the first `span` columns, a size fixed per captured graph; the step's mask hides the columns
    not yet written. It offers the `update` that `Attention` calls, so the model code is shared.
    """

    def __init__(self, cache: KVCache, column: torch.Tensor, span: int) -> None:
        if span > cache.max_length:
            raise ValueError(f"KV cache holds {cache.max_length} tokens; a span of {span} requested")
        self.cache, self.column, self.span = cache, column, span

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's keys/values [B, H, 1, D] at the column; return the span's."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys.index_copy_(2, self.column, k.to(keys.dtype))
        values.index_copy_(2, self.column, v.to(values.dtype))
        return keys[:, :, :self.span], values[:, :, :self.span]
