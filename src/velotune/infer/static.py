"""The static-shape decode step, and its CUDA-graph replay.

Why: decoding one token per row runs a few hundred small kernels per step; launched one by one
from Python, the GPU waits on the host (the eager engine ran at transformers' speed, 1.01x, on an
H100 at batch 64 for a 1B model). A step whose tensors never change shape or address can be
captured once in a `torch.cuda.CUDAGraph` and replayed with one launch.

What makes the step static:
- inputs live in fixed buffers: token ids [B, 1], positions [B, 1] (per row: left-padded prompts
  count real tokens only) and the cache column [1], all on the device and advanced in place;
- keys/values are written with `index_copy_` at the column tensor (`infer.cache.StaticSlot`);
- the mask comes from device tensors: `valid` [B, max_length] (False on prompt padding) and
  key index <= column (and inside the sliding window where a layer has one);
- logits are copied into one [B, vocab] buffer that sampling reads after the replay.
No step reads a Python int that changes between steps, calls `.item()` or syncs with the host.

Attention span: a graph fixes how many cache columns attention reads. Reading the whole
preallocated cache every step costs O(max_length) per token even early on, so the span is
bucketed: the smallest power of two above the column, at least `MIN_SPAN`, capped at the cache
length. One graph is captured per bucket actually reached (lazily, on first use), so at most
twice the needed columns are read, at the price of a capture per doubling (log2 of the length:
e.g. 256, 512, 640 for a 128-token prompt and 512 new tokens). The graphs share one memory pool;
they never run concurrently and every output goes to the buffers above, so that is safe.

Graphs belong to one `GenerationRun` and die with it: nothing is held between generate calls
(GRPO trains between them and needs that memory back). A graph reads the parameters' storage,
so weights changed in place (an optimizer step, a LoRA update) are seen by the next replay;
replacing a parameter object (merge of a 4-bit base, `to()`) is not, and must happen outside a
run. Sampling runs after each replay, as ordinary eager ops.

On CPU, or when capture fails in "auto" mode, the same step runs eagerly.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from velotune.infer.cache import KVCache, StaticSlot

if TYPE_CHECKING:
    from velotune.models.transformer import Transformer

MIN_SPAN = 64
WARMUP_STEPS = 2  # before capture: Triton compilation and autotuning, cuBLAS workspaces, allocator


def span_for(column: int, max_length: int) -> int:
    """Cache columns the step that writes `column` attends over (see the module docstring)."""
    span = MIN_SPAN
    while span <= column:
        span *= 2
    return min(span, max_length)


class StaticDecoder:
    """Decodes one token per row per `step`, from a cache that prefill filled up to `column`.

    `valid` [B, max_length] bool: True where a cache column holds a real token of that row
    (False on left padding); columns from `column` on are generated tokens, always valid.
    `positions` [B, 1]: the position of each row's next token. `logits`: prefill's last-position
    logits, whose shape and dtype the step's output buffer takes (allocated here, on the current
    stream, not inside a warm-up on the side stream).
    """

    def __init__(self, model: Transformer, cache: KVCache, valid: torch.Tensor, positions: torch.Tensor,
                 column: int, logits: torch.Tensor, *, use_graphs: bool, require_graphs: bool = False) -> None:
        if use_graphs and cache.k.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {cache.k.device}")
        self.model, self.cache, self.valid = model, cache, valid
        device = cache.k.device
        self.ids = torch.zeros(valid.shape[0], 1, dtype=torch.long, device=device)
        self.positions = positions.clone()
        self.column = torch.tensor([column], dtype=torch.long, device=device)
        self.host_column = column  # only picks the span bucket; never read inside a step
        self.logits = torch.empty_like(logits)
        # A table in host memory (models/host_embedding.py) is read by a host gather, which a CUDA
        # graph cannot capture: its rows are then looked up eagerly before each step into this
        # fixed buffer, and the step starts from there.
        self.rows: torch.Tensor | None = None
        embed = model.model.embed_tokens
        if getattr(embed, "gathers_on_host", False):
            self.rows = torch.empty(valid.shape[0], 1, embed.embedding_dim, dtype=embed.weight.dtype, device=device)
        self.use_graphs, self.require_graphs = use_graphs, require_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed `token` [B] at the current column; logits [B, vocab] for the next token. The
        returned tensor is a buffer that the next step overwrites."""
        if self.host_column >= self.cache.max_length:
            raise ValueError(f"KV cache holds {self.cache.max_length} tokens; column {self.host_column} requested")
        self.ids.copy_(token.view(-1, 1))
        if self.rows is not None:
            self.rows.copy_(self.model.model.embed_tokens(token.view(-1, 1)))
        span = span_for(self.host_column, self.cache.max_length)
        if self.use_graphs and span not in self.graphs:
            self._capture(span)
        if self.use_graphs:
            self.graphs[span].replay()
        else:
            self.forward(span)
        self.positions.add_(1)
        self.column.add_(1)
        self.host_column += 1
        return self.logits

    def forward(self, span: int) -> None:
        """One decode step over `span` cache columns, every input and output a fixed buffer.
        Mirrors `Transformer.hidden_states` for one token, with the mask built on the device."""
        model, c = self.model, self.model.config
        x = self.rows if self.rows is not None else model.model.embed_tokens(self.ids)
        if c.embedding_multiplier != 1.0:
            x = x * torch.tensor(c.embedding_multiplier, dtype=x.dtype)
        ropes = model.model.rotary.per_layer(self.positions, x.dtype)
        keys = torch.arange(span, device=x.device)
        allowed = (self.valid[:, :span] & (keys <= self.column))[:, None, None, :]
        windows = {c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)}
        masks = {w: allowed if w is None else allowed & (self.column - keys < w) for w in windows}
        slot = StaticSlot(self.cache, self.column, span)
        for i, layer in enumerate(model.model.layers):
            x = layer(x, *ropes[i], masks[c.sliding_window if c.is_sliding(i) else None], slot)
        self.logits.copy_(model.logits_from_hidden(model.model.norm(x)[:, -1]))

    def _capture(self, span: int) -> None:
        """Warm up on a side stream, then capture. Warm-up steps write the same keys/values the
        real step writes (same token, same column), so running them changes nothing."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.forward(span)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.forward(span)
        except RuntimeError as err:
            if self.require_graphs:
                raise RuntimeError(f"decode='graph': capturing the decode step (span {span}) failed: {err}") from err
            warnings.warn(f"CUDA graph capture of the decode step failed ({err}); decoding eagerly", stacklevel=3)
            self.use_graphs, self.graphs = False, {}
            return
        self.graphs[span] = graph
