"""The forward and backward of a training micro-batch, captured once per shape as a CUDA graph and
replayed.

Why: at small micro-batches a training step is launch-bound. Profiled on an H100 (2026-11-23),
Llama-3.1-8B LoRA at micro-batch 1 x 2,048 tokens took 293 ms per step while the GPU was busy for
169 ms: Python, autograd and the dispatcher queue about 5,600 kernels per step more slowly than
the GPU runs them. A replayed graph launches all of them at once.

What a capture needs, and how it is met:
- Fixed shapes and addresses: a micro-batch is copied into input buffers owned here, one graph per
  shape, up to `max_shapes`; other shapes run eagerly. A padding-free micro-batch
  (data/batching.py:collate_flat) comes in a few bucketed widths, each with a fixed number of
  document slots and a fixed bound on document length, so one graph per (width, slots, bound)
  serves a whole run of variable-length rows; its document offsets (`cu_seqlens`) are an input
  buffer like the ids. Graphs share one memory pool (they never run at the same time), so their
  memory is that of the largest.
- No host synchronisation inside: the model code asks `kernels.capturing()` and then sends every
  position through the loss (ignore_index drops the non-targets), builds packed-document ids
  without testing whether there are any (position ids are passed only for batches found packed
  here), and checkpoints without saving the RNG state. Labels are checked here, before the copy.
- Nothing random: a model with active dropout is refused (`models/loop_graphs.py:graph_blockers`).
- Checkpoints offloaded to host memory (`offload_checkpoints`): the copies and their events are
  captured; the pinned buffers the capture leased from the model's pool are held for as long as
  its graph lives, and later captures lease them again where sizes allow (graphs replay one at a
  time: models/offload.py, `PinnedHostPool.hold`), so host memory is about that of the widest
  shape, not one set per shape.
- An input embedding table kept in host memory (`offload_embeddings`) is looked up here, before
  the replay, into an input buffer the graph starts from (`inputs_embeds`): the gather runs on
  the CPU, which a graph cannot hold.
- Gradients: the parameters' `.grad` are buffers owned here that the captured backward adds into,
  so micro-batches accumulate as they do eagerly. An optimizer's `zero_grad(set_to_none=True)`
  drops them; the next call re-attaches them, zeroed.
- The loss scale (1 / target tokens of the whole optimizer step, which makes accumulation exact)
  is an input buffer too.
The first call for a shape runs eagerly on a side stream (Triton compiles, cuBLAS picks its
kernels: nothing lazy may happen during a capture); the second captures and replays. Both are that
micro-batch's real work. Replays were measured no slower than eager steps at every shape tried:
on an H100, Llama-3.1-8B LoRA micro-batch 1 x 2,048 went from 313 to 180 ms per step and
micro-batch 4 x 2,048, which is not launch-bound, from 702 to 671 ms; so no shape is timed eagerly
before it is captured (which cost one more eager step per width). If a capture fails,
`GraphCaptureError` stops the run with the cause and the key that turns graphs off.

Memory that does not grow with the number of shapes (measured with benchmarks/memory_sites.py on an
H100, 2026-12-07, `velotune train` of Llama-3.1-8B LoRA over 300 rows of varying length, 12 shapes):
- one stream for every warm-up and every capture. cuBLAS keeps a workspace per stream it has run
  on, for the life of the process; a new stream per shape left 1.25 GiB of workspaces allocated
  at the run's peak (the first matmul of each warm-up: the q/k/v projection of layer 0).
- `max_tokens` (the most tokens a micro-batch can hold, which the trainer knows): the input
  embeddings of every shape are views of one buffer of that size (0.41 GiB of per-shape buffers
  at the same peak), and offloaded checkpoints lease host buffers of the largest size from the
  first step on (`PinnedHostPool.max_tokens`), so a wider shape later in the run does not pin new
  host memory.
- every micro-batch run here leases held host buffers (`_leasing`), the eager warm-ups too. Until
  that, a new width's warm-up could not lease the buffers the earlier graphs held and pinned a
  set of its own: measured on an H100 (benchmarks/offload_widths.py, 8B micro-batch 4, 2026-12-07),
  7 GiB pinned twice at 3.8-4.3 s each, most of what offloaded checkpoints cost a 300-row epoch.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from velotune.kernels.ops.launch import check_label_range
from velotune.models.host_embedding import on_host
from velotune.models.loop_graphs import attach_grad_buffers
from velotune.models.masks import DocumentSpans, document_ids

IGNORE_INDEX = -100


class GraphCaptureError(RuntimeError):
    """The step could not be captured (names the cause and `cuda_graphs: false`)."""


@dataclass
class _Captured:
    """One shape's graph, its input buffers and its output."""

    graph: torch.cuda.CUDAGraph | None
    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None
    embeds: torch.Tensor | None     # the rows of a host-memory embedding table, looked up outside
    documents: DocumentSpans | None = None   # a padding-free batch's spans (offsets buffer, bound)
    loss_sum: torch.Tensor | None = None
    graph_seconds: float | None = None       # the first replay
    host_buffers: list = field(default_factory=list)   # offload buffers the graph copies into


Shape = tuple[int, int, bool, int, int]   # (batch, length, packed, document slots, document bound)


class GraphedMicroStep:
    """`step(ids, labels, position_ids, scale, cu_seqlens=, max_document_length=)` adds
    d(scale x summed loss)/d(params) to the parameters' .grad and returns the micro-batch's summed
    loss (a float32 CUDA tensor, valid until the next call): what `Trainer.accumulate` does for one
    micro-batch, from a replayed graph."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], *, amp_dtype: torch.dtype | None = None,
                 max_shapes: int = 4, max_tokens: int | None = None) -> None:
        """`max_tokens`: the most tokens (batch x length) a micro-batch will have, when known: the
        shapes then share their input-embedding buffer and offload buffers are sized for it."""
        self.model, self.params = model, list(params)
        self.device = self.params[0].device
        self.amp_dtype = amp_dtype
        self.max_shapes = max_shapes
        self.max_tokens = max_tokens
        self.vocab_size: int = model.config.vocab_size
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.scale = torch.zeros((), dtype=torch.float32, device=self.device)
        self.shapes: dict[Shape, _Captured] = {}
        self.pool = None
        self.stream = torch.cuda.Stream(self.device)   # every warm-up and capture (one cuBLAS workspace)
        self.shared_embeds: torch.Tensor | None = None
        self.replays = 0
        self.eager_calls = 0
        offload_pool = getattr(model, "offload_pool", None)
        if offload_pool is not None:   # offloaded checkpoints: buffers a capture can copy into
            offload_pool.capturable = True
            offload_pool.release_free()
            offload_pool.max_tokens = max_tokens

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                 scale: float = 1.0, *, cu_seqlens: torch.Tensor | None = None,
                 max_document_length: int | None = None) -> torch.Tensor:
        """`cu_seqlens` and `max_document_length` (with `position_ids`): a padding-free batch's
        document spans (data/batching.py:collate_flat)."""
        check_label_range(labels, self.vocab_size, IGNORE_INDEX, "labels")
        if cu_seqlens is not None and (position_ids is None or max_document_length is None):
            raise ValueError("cu_seqlens needs position_ids and max_document_length")
        if cu_seqlens is None and position_ids is not None and document_ids(position_ids) is None:
            position_ids = None   # one document per row: plain causal attention, no mask
        self._attach_grads()
        self.scale.fill_(scale)
        key = (ids.shape[0], ids.shape[1], position_ids is not None,
               -1 if cu_seqlens is None else cu_seqlens.numel(), max_document_length or 0)
        entry = self.shapes.get(key)
        if entry is None and len(self.shapes) >= self.max_shapes:
            return self._eager(ids, labels, position_ids, cu_seqlens, max_document_length)
        if entry is None:   # first sight of this shape: run eagerly, as warm-up, on a side stream
            entry = self.shapes[key] = self._buffers(ids.shape, position_ids is not None, cu_seqlens,
                                                     max_document_length)
            self._fill(entry, ids, labels, position_ids, cu_seqlens)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream), self._leasing():
                loss = self._forward_backward(entry)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.eager_calls += 1
            return loss
        self._fill(entry, ids, labels, position_ids, cu_seqlens)
        if entry.graph is None:
            return self._capture(entry)
        entry.graph.replay()
        self.replays += 1
        return entry.loss_sum

    @property
    def timings(self) -> dict[Shape, float | None]:
        """shape -> seconds of its first replay (None: not captured yet)."""
        return {key: e.graph_seconds for key, e in self.shapes.items()}

    def describe(self) -> str:
        """One line for the run log: the captured shapes and their first replay times."""
        captured = [(key, e) for key, e in self.shapes.items() if e.graph_seconds is not None]
        if not captured:
            return "CUDA graphs: no shape captured yet"
        shown = ", ".join(f"{b} x {t}{' packed' if packed else ''}: {e.graph_seconds * 1e3:.0f} ms"
                          for (b, t, packed, _, _), e in sorted(captured, key=lambda item: item[0][:2])[:6])
        more = f" and {len(captured) - 6} more" if len(captured) > 6 else ""
        return (f"CUDA graphs: {len(captured)} micro-batch shapes replayed ({shown}{more}); {self.replays} replays, "
                f"{self.eager_calls} micro-batches eager (a shape's first, or past {self.max_shapes} shapes)")

    # ---- pieces ------------------------------------------------------------------------------

    def _attach_grads(self) -> None:
        """Make every parameter's .grad the buffer the graph adds into (zeroed when it was dropped)."""
        attach_grad_buffers(zip(self.params, self.grads))

    def _buffers(self, shape: torch.Size, packed: bool, cu_seqlens: torch.Tensor | None,
                 max_document_length: int | None) -> _Captured:
        def ids() -> torch.Tensor:
            return torch.empty(shape, dtype=torch.long, device=self.device)

        embeds = None
        if on_host(self.model):
            table = self.model.model.embed_tokens.weight
            tokens = shape[0] * shape[1]
            if self.max_tokens and tokens <= self.max_tokens:   # graphs replay one at a time: one buffer
                if self.shared_embeds is None:
                    self.shared_embeds = torch.empty(self.max_tokens, table.shape[1], dtype=table.dtype,
                                                     device=self.device)
                embeds = self.shared_embeds[:tokens].view(*shape, table.shape[1])
            else:
                embeds = torch.empty(*shape, table.shape[1], dtype=table.dtype, device=self.device)
        documents = None
        if cu_seqlens is not None:
            offsets = torch.empty(cu_seqlens.shape, dtype=torch.int32, device=self.device)
            documents = DocumentSpans(offsets, int(max_document_length))   # type: ignore[arg-type]
        return _Captured(None, ids(), ids(), ids() if packed else None, embeds, documents)

    def _fill(self, entry: _Captured, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None,
              cu_seqlens: torch.Tensor | None) -> None:
        entry.ids.copy_(ids, non_blocking=True)
        entry.labels.copy_(labels, non_blocking=True)
        if positions is not None:
            entry.positions.copy_(positions, non_blocking=True)
        if entry.documents is not None:
            entry.documents.cu_seqlens.copy_(cu_seqlens, non_blocking=True)
        if entry.embeds is not None:   # ids on the CPU (the trainer's batch) gather without a sync
            entry.embeds.copy_(self.model.model.embed_tokens(ids), non_blocking=True)

    def _eager(self, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None, max_document_length: int | None) -> torch.Tensor:
        """One micro-batch without a graph (a shape past `max_shapes`)."""
        entry = self._buffers(ids.shape, positions is not None, cu_seqlens, max_document_length)
        self._fill(entry, ids, labels, positions, cu_seqlens)
        self.eager_calls += 1
        with self._leasing():
            return self._forward_backward(entry)

    def _leasing(self) -> contextlib.AbstractContextManager[list]:
        """Offloaded checkpoints of a micro-batch run here (a warm-up, a capture, or an eager step
        past `max_shapes`) lease from the model's pool inside a recording: its forward and backward
        both run before any graph replays again, so they may copy into the buffers the graphs hold
        instead of pinning a set of their own (which took about 4 s per 7 GiB on an H100)."""
        pool = getattr(self.model, "offload_pool", None)
        return pool.recording() if pool is not None else contextlib.nullcontext([])

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # autocast's cast cache must be off inside a capture (torch's CUDA graph rules)
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _forward_backward(self, entry: _Captured) -> torch.Tensor:
        with self._autocast():
            out = self.model(entry.ids, position_ids=entry.positions, labels=entry.labels, return_logits=False,
                             inputs_embeds=entry.embeds, documents=entry.documents)
        loss_sum = out.loss_sum.float()
        (loss_sum * self.scale).backward()
        return loss_sum.detach()

    def _capture(self, entry: _Captured) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        try:   # (entering the capture synchronises and empties the allocator's cache of freed blocks)
            with self._leasing() as leased, torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                entry.loss_sum = self._forward_backward(entry)
        except RuntimeError as error:
            # Not a fallback to eager: on an H100 (torch 2.11) a process whose capture failed ran
            # later, unrelated CUDA work wrongly, so the run stops here with the cause.
            raise GraphCaptureError(f"CUDA graph capture of the training step failed: {str(error).splitlines()[0]}. "
                                    "Something in the forward or backward waits for the GPU (a .item(), a "
                                    "printed or tested GPU value, a hook); set cuda_graphs: false to train "
                                    "without graphs") from error
        if leased:   # every replay copies the offloaded checkpoints into these host buffers
            self.model.offload_pool.hold(leased)
            entry.host_buffers = leased
        if self.pool is None:
            self.pool = graph.pool()
        entry.graph = graph
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()   # the replay alone, not the capture
        graph.replay()   # the capture only recorded: this runs the micro-batch
        torch.cuda.synchronize(self.device)
        entry.graph_seconds = time.perf_counter() - start
        self.replays += 1
        return entry.loss_sum
