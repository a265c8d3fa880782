"""A user's own training loop, replayed as CUDA graphs: `loss = model(ids, labels=ids).loss;
loss.backward()` with a shape seen before runs a captured forward graph, and its `backward()` a
captured backward graph.

Why: at small micro-batches an eager step is bound by the host, not the GPU. On an H100
(2026-12-08) Llama-3.1-8B LoRA at micro-batch 1 x 2,048 kept the GPU busy 146.7 ms of a 408.8 ms
eager step (benchmarks/profile_step.py), and the trainer's graphed replay of the same micro-batch
took ~180 ms against 313 eager (train/graphed_step.py). A user's loop that calls the model itself
never reaches the trainer's graphs; this gives it the same replays without a flag.

When a call replays (`LoopGraphs.reasons` lists what stands in the way; any reason runs it eagerly,
unchanged):
- a training forward on a CUDA device with gradients recorded, labels given, perhaps a padding
  mask [B, T] (an input buffer of its own graph, padded with zeros; one of all ones, as a tokenizer
  gives an unpadded batch, counts as none), and nothing else: no position ids, packed documents, cache,
  input embeddings, images, logits or per-token log-probabilities asked for; no autocast (its cast
  cache cannot live in a graph), no process group (DDP and FSDP reduce through host-side hooks),
  no torch.compile tracing the model (it makes its own graphs);
- no dropout, mixture of experts (its router's token counts go to the host) or vision tower;
- fewer tokens (padded) than `checkpointing.gpu_bound_tokens`: above it the GPU is the bottleneck
  and a graph gains little for the memory it holds; and no checkpoint offloaded by this forward;
- the shape was seen once before, rows counted at their bucket width (`widths.bucket_width`:
  multiples of 256 tokens to 2,048, then at most 12.5% more), so a loop over rows of every length
  replays a few graphs: the ids are padded on the right with token 0 and the labels with -100,
  which causal attention keeps from every real token, and the summed loss and target count are
  those of the unpadded rows (their values within float rounding: matmuls of another length).
  The first call of a width runs eagerly, unpadded (Triton compiles, cuBLAS picks kernels); the
  second warms the capture stream up with one more forward and backward (discarded), captures
  and replays; at most `max_shapes` shapes are kept;
- no earlier replayed forward still waits for its backward (see below).

What a replay keeps the same, and how:
- Gradients: the captured backward adds into the parameters' `.grad`, buffers owned here and
  attached at each forward (zeroed after `zero_grad(set_to_none=True)`), so micro-batches
  accumulate and optimizers, clipping and extra loss terms see ordinary `.grad` tensors. The
  upstream gradient of the summed loss (what `out.loss = loss_sum / num_targets` or any other use
  makes of it) is an input buffer of the backward graph: the same arithmetic as eager
  (tests/models/test_loop_graphs_gpu.py asks for the same bits on one shape).
- The parameters, buffers, adapter switches and hooks the graph was captured with: any change
  (a parameter replaced or frozen, `disable_adapters`, a merge, a hook, `model.to(...)`) drops
  that shape's graphs and the call runs eagerly, as a first sight.
- One forward at a time: graphs share one memory pool, and a replayed forward's saved tensors
  live in it until its backward. A forward that comes while another replayed forward still waits
  (two micro-batches' losses summed before one `backward()`) runs eagerly; a forward whose loss is
  dropped without a backward frees its turn when its autograd graph is freed.
- An input embedding table in host memory (`put_embeddings_on_host`) is looked up eagerly before
  each replay, into rows every shape's graphs read from one shared buffer (a gather on the host
  cannot be captured).
- Labels are checked against the vocabulary before the replay, as the eager loss does.
Not returned by a replay: `hidden_states` (None); ask for `return_logits=True` or
`return_token_logps=True`, or set `model.cuda_graphs = False`, to run eagerly.
If a capture fails, `LoopGraphError` says so and names `model.cuda_graphs = False`.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from velotune import kernels
from velotune.kernels.ops.launch import check_label_range
from velotune.models.checkpointing import gpu_bound_tokens
from velotune.models.moe import MoE
from velotune.widths import bucket_width

IGNORE_INDEX = -100
CAPTURE_MODE = "thread_local"
# Bucket widths to 2,048 tokens number 8; a few batch sizes more (a last, smaller batch). Graphs share
# one memory pool, so more shapes cost capture time (one warm-up step each), not memory.
MAX_SHAPES = 32


class LoopGraphError(RuntimeError):
    """A training forward could not be captured (names the cause and `model.cuda_graphs = False`)."""


def graph_blockers(model: nn.Module) -> list[str]:
    """Why `model` itself can never replay a training step as a CUDA graph (empty when it can):
    no CUDA device, active dropout (random), a vision tower (micro-batches carry varying numbers
    of images). The trainer's graphed step (train/graphed_step.py) asks this too."""
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    dropout = Survey.of(model).dropout
    if dropout is not None:
        reasons.append(f"dropout is random (e.g. {dropout}); set it to 0")
    if getattr(getattr(model, "config", None), "vision", None) is not None:
        reasons.append("a vision-language model's micro-batches carry a varying number of images")
    return reasons


@dataclass
class Survey:
    """One walk over a model's modules: what a captured graph depends on besides its inputs
    (`stamp`: every parameter's and buffer's address and whether it trains, each module's adapter
    switches and hooks, whether kernels are on; equal stamps mean a replay computes what the eager
    forward would), the parameters that train, and the first active dropout module."""

    stamp: tuple
    trainable: list[nn.Parameter]
    dropout: str | None

    @classmethod
    def of(cls, model: nn.Module) -> Survey:
        # Every training forward takes one, so it walks the modules' own dictionaries with a stack:
        # 1.4 ms for a 32-layer model under LoRA (1,287 modules) on this project's 2-core CI
        # machine, where `named_modules()` with the same checks took 8.7 ms.
        stamp: list = [kernels.kernels_enabled()]
        add = stamp.append
        trainable: list[nn.Parameter] = []
        dropout: nn.Module | None = None
        stack: list[nn.Module] = [model]
        while stack:
            module = stack.pop()
            own = module.__dict__
            for p in own["_parameters"].values():
                if p is not None:
                    add(p.data_ptr())
                    if p.requires_grad:
                        add(True)
                        trainable.append(p)
            for b in own["_buffers"].values():
                if b is not None:
                    add(b.data_ptr())
            if own["_forward_hooks"] or own["_forward_pre_hooks"] or own["_backward_hooks"] \
                    or own["_backward_pre_hooks"]:
                add("hooked")
            if "adapters_enabled" in own:   # a LoRA layer's switches
                add((own["adapters_enabled"], own.get("merged")))
            if dropout is None and isinstance(module, nn.Dropout) and module.p > 0 and module.training:
                dropout = module
            stack.extend(m for m in own["_modules"].values() if m is not None)
        name = None if dropout is None else next(n for n, m in model.named_modules() if m is dropout)
        return cls(tuple(stamp), trainable, name)


def attach_grad_buffers(pairs: Iterable[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Make each parameter's .grad its buffer, which a captured backward adds into: zeroed where
    the optimizer dropped the gradient (`zero_grad(set_to_none=True)`), the caller's gradient copied
    in where something replaced it. Shared with the trainer's graphed step."""
    dropped = []
    for p, g in pairs:
        if p.grad is g:
            continue
        if p.grad is None:
            dropped.append(g)
        else:
            g.copy_(p.grad)
        p.grad = g
    if dropped:
        torch._foreach_zero_(dropped)


@dataclass
class _Pair:
    """One shape's forward and backward graphs, their input buffers and outputs."""

    stamp: tuple                              # `Survey.stamp` at capture
    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None                 # a padding mask, where the shape's graphs take one
    embeds: torch.Tensor | None               # rows of a host-memory embedding table, looked up outside
    forward: torch.cuda.CUDAGraph | None = None
    backward: torch.cuda.CUDAGraph | None = None
    loss_sum: torch.Tensor | None = None      # outputs of the forward graph
    num_targets: torch.Tensor | None = None
    upstream: torch.Tensor | None = None      # d(result)/d(loss_sum): the backward graph's input
    forwards: int = 0                         # replays of the forward (a backward must follow its own)


class _Turn:
    """A replayed forward whose backward may still come. Its autograd node holds it; freed with
    the node (a loss dropped without a backward), it hands the turn back."""

    def __init__(self, pair: _Pair, owner: LoopGraphs) -> None:
        self.pair, self.forward = pair, 0
        weakref.finalize(self, owner.release, id(self))


class _Replay(torch.autograd.Function):
    """(loss_sum, num_targets) of a replayed forward; its backward replays the backward graph with
    the incoming gradient, which adds the parameters' gradients into their `.grad`."""

    @staticmethod
    def forward(ctx, turn: _Turn, owner: LoopGraphs, anchor: torch.Tensor):  # type: ignore[override]
        pair = turn.pair
        pair.forward.replay()
        pair.forwards += 1
        turn.forward = pair.forwards
        ctx.turn, ctx.owner = turn, owner
        num_targets = pair.num_targets.clone()
        ctx.mark_non_differentiable(num_targets)
        return pair.loss_sum.clone(), num_targets

    @staticmethod
    @once_differentiable
    def backward(ctx, d_loss: torch.Tensor, _d_count: torch.Tensor | None):  # type: ignore[override]
        turn: _Turn = ctx.turn
        pair = turn.pair
        if pair.forwards != turn.forward:
            raise RuntimeError("this CUDA-graphed training forward's graph was replayed again before its backward "
                               "(a second backward(retain_graph=True) after another forward); set "
                               "model.cuda_graphs = False for such loops")
        ctx.owner.attach_grads()
        pair.upstream.copy_(d_loss)
        pair.backward.replay()
        ctx.owner.release(id(turn))
        return None, None, None


class LoopGraphs:
    """A model's captured training steps: `Transformer.forward` asks `run` first."""

    def __init__(self, max_shapes: int = MAX_SHAPES) -> None:
        self.max_shapes = max_shapes
        self.seen: set[tuple] = set()                  # shapes run eagerly once
        self.pairs: dict[tuple, _Pair] = {}
        self.grads: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}   # the .grad buffers graphs add into
        self.turn: int | None = None                   # id of the replayed forward awaiting its backward
        self.busy = False                              # inside our own warm-up or capture
        self.replays = 0
        self.eager_calls = 0
        self.stream: torch.cuda.Stream | None = None   # every warm-up and capture (one cuBLAS workspace)
        self.pool: tuple | None = None                 # one memory pool for every graph
        self.anchor: torch.Tensor | None = None
        self.embeds: torch.Tensor | None = None        # every shape's input-embedding rows (see `_capture`)

    def __reduce__(self) -> tuple:
        return LoopGraphs, (self.max_shapes,)   # a copied or pickled model captures its own graphs

    def reasons(self, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None, plain: bool,
                survey: Survey | None = None, attention_mask: torch.Tensor | None = None) -> list[str]:
        """Why this call runs eagerly (empty: it replays or is captured). `plain`: the call passes
        nothing but ids, labels and `attention_mask`; `survey`: the model's (`Survey.of`), for the
        dropout check."""
        reasons = []
        if not getattr(model, "cuda_graphs", False):
            reasons.append("model.cuda_graphs is off")
        if not input_ids.is_cuda:
            reasons.append(f"the model runs on {input_ids.device.type}")
        if not (model.training and torch.is_grad_enabled()):
            reasons.append("not a training forward (eval mode or no gradients)")
        if labels is None or not plain:
            reasons.append("not a forward of ids, labels and a padding mask alone")
        elif input_ids.dim() != 2 or labels.shape != input_ids.shape:
            reasons.append("the ids are not [batch, length] or the labels are not shaped like them")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            reasons.append("the attention mask is not shaped like the ids")
        if torch.is_autocast_enabled(input_ids.device.type):
            reasons.append("autocast is on")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            reasons.append("a process group is running (DDP and FSDP reduce through host-side hooks)")
        if self.busy or kernels.capturing(input_ids):
            reasons.append("inside a capture or its warm-up")
        if torch.compiler.is_compiling():
            reasons.append("torch.compile is tracing the model")
        if any(isinstance(layer.mlp, MoE) for layer in model.model.layers):
            reasons.append("a mixture of experts sends its token counts to the host")
        if model.config.vision is not None:
            reasons.append("a vision-language model's batches carry a varying number of images")
        tokens = input_ids.shape[0] * self.width(model, input_ids)
        if tokens >= gpu_bound_tokens(model.config):
            reasons.append(f"{tokens:,} tokens keep the GPU busy without graphs")
        if model.offloads(tokens) and model.gradient_checkpointing is not False:
            reasons.append("this forward offloads its checkpoints to host memory")
        if self.turn is not None:
            reasons.append("an earlier replayed forward still waits for its backward")
        if survey is not None and survey.dropout is not None:
            reasons.append(f"dropout is random ({survey.dropout})")
        return reasons

    @staticmethod
    def width(model: nn.Module, input_ids: torch.Tensor) -> int:
        """The padded length rows of `input_ids` replay at: their bucket width, or their own length
        where the bucket would pass the model's positions."""
        t = input_ids.shape[-1]
        width = bucket_width(t)
        return t if width > model.config.max_position_embeddings else width

    def run(self, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None, plain: bool,
            attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(loss_sum, num_targets) from a replay, or None: the caller runs the forward eagerly.
        `attention_mask`: a padding mask that is not all ones (the caller drops those)."""
        if self.busy or not (model.training and torch.is_grad_enabled()):   # our own warm-ups and
            return None                                                        # captures; evaluations
        if self.reasons(model, input_ids, labels, plain, attention_mask=attention_mask):   # cheap checks: no walk
            self.eager_calls += 1
            return None
        survey = Survey.of(model)
        if survey.dropout is not None or not survey.trainable:
            self.eager_calls += 1
            return None
        if self.attach_grads(survey.trainable):   # new .grad buffers: no graph writes the old ones again
            self.pairs.clear()
            self.seen.clear()
        shape = (input_ids.shape[0], self.width(model, input_ids))
        key = (shape, attention_mask is not None, input_ids.device, model.gradient_checkpointing)
        pair = self.pairs.get(key)
        if pair is not None and pair.stamp != survey.stamp:
            del self.pairs[key]   # parameters, switches or hooks changed: this shape is seen afresh
            self.seen.discard(key)
            pair = None
        if pair is None and (key not in self.seen or len(self.pairs) >= self.max_shapes):
            self.seen.add(key)
            self.eager_calls += 1
            return None
        if pair is None:
            pair = self.pairs[key] = self._capture(model, shape, input_ids, labels, attention_mask, survey)
        self._fill(model, pair, input_ids, labels, attention_mask)
        # Last before the replay: the check waits for the GPU, which then idles only until the replay.
        check_label_range(labels, model.config.vocab_size, IGNORE_INDEX, "labels")
        turn = _Turn(pair, self)
        self.turn = id(turn)
        if self.anchor is None:   # a leaf that requires grad, so the replay's outputs do (it gets none)
            self.anchor = torch.empty(0, device=input_ids.device, requires_grad=True)
        loss_sum, num_targets = _Replay.apply(turn, self, self.anchor)
        self.replays += 1
        return loss_sum, num_targets

    def release(self, turn: int) -> None:
        """The forward `turn` had its backward, or its autograd graph was freed: another may replay."""
        if self.turn == turn:
            self.turn = None

    def attach_grads(self, trainable: list[nn.Parameter] | None = None) -> bool:
        """Make each trainable parameter's .grad the buffer the backward graphs add into: zeroed
        where the optimizer dropped it, the caller's gradient copied in where it replaced it.
        `trainable`: the parameters that train now; a new set gets new buffers, and then True."""
        rebuilt = trainable is not None and [id(p) for p in trainable] != list(self.grads)
        if rebuilt:
            self.grads = {id(p): (p, torch.zeros_like(p)) for p in trainable}
        attach_grad_buffers(self.grads.values())
        return rebuilt

    def describe(self) -> str:
        return (f"CUDA graphs of the training loop: {len(self.pairs)} shapes captured, {self.replays} replays, "
                f"{self.eager_calls} eager forwards")

    # ---- pieces ------------------------------------------------------------------------------

    def _fill(self, model: nn.Module, pair: _Pair, input_ids: torch.Tensor, labels: torch.Tensor,
              attention_mask: torch.Tensor | None) -> None:
        """The call's rows into the input buffers, padded on the right: token 0, label -100, mask 0
        (the embeddings' pad rows keep whatever finite rows they held: no real token attends to them)."""
        t = input_ids.shape[-1]
        pair.ids[:, :t].copy_(input_ids, non_blocking=True)
        pair.ids[:, t:].zero_()
        pair.labels[:, :t].copy_(labels, non_blocking=True)
        pair.labels[:, t:].fill_(IGNORE_INDEX)
        if pair.mask is not None:
            pair.mask[:, :t].copy_(attention_mask, non_blocking=True)
            pair.mask[:, t:].zero_()
        if pair.embeds is not None:   # a host-memory table: its gather cannot be captured
            pair.embeds[:, :t].copy_(model.model.embed_tokens(input_ids), non_blocking=True)

    def _forward(self, model: nn.Module, pair: _Pair) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(pair.ids, attention_mask=pair.mask, labels=pair.labels, return_logits=False,
                    inputs_embeds=pair.embeds)
        return out.loss_sum, out.num_targets

    def _capture(self, model: nn.Module, shape: tuple[int, int], input_ids: torch.Tensor, labels: torch.Tensor,
                 attention_mask: torch.Tensor | None, survey: Survey) -> _Pair:
        """Warm the shape up once on the capture stream (its gradients discarded), then capture its
        forward and its backward into the pool every shape shares."""
        device = input_ids.device
        table = model.model.embed_tokens
        embeds = None
        if getattr(table, "gathers_on_host", False):
            # One buffer of the most tokens a replayed call can have, every shape's rows a view of
            # it: replays never overlap (one forward waits for its backward at a time), and 32
            # shapes of their own would hold up to 32 x 45 MiB at 8B.
            if self.embeds is None or self.embeds.dtype != table.weight.dtype or self.embeds.device != device:
                self.embeds = torch.zeros(gpu_bound_tokens(model.config), table.embedding_dim,
                                          dtype=table.weight.dtype, device=device)
            embeds = self.embeds[:shape[0] * shape[1]].view(*shape, table.embedding_dim)
        mask = None if attention_mask is None else torch.empty(shape, dtype=attention_mask.dtype, device=device)
        pair = _Pair(survey.stamp, torch.empty(shape, dtype=input_ids.dtype, device=device),
                     torch.empty(shape, dtype=labels.dtype, device=device), mask, embeds)
        self._fill(model, pair, input_ids, labels, attention_mask)
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self.busy = True
        try:
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                loss_sum, _ = self._forward(model, pair)
                # a whole backward (every kernel it will capture), into gradients put back after
                kept = [p.grad for p in survey.trainable]
                for p in survey.trainable:
                    p.grad = None
                loss_sum.backward()
                for p, g in zip(survey.trainable, kept):
                    p.grad = g
            torch.cuda.current_stream(device).wait_stream(self.stream)
            # "thread_local": a user's loop may run other threads beside the capture (a DataLoader's
            # pin-memory thread allocating pinned buffers), whose calls the default "global" mode
            # turns into a failed capture; the capture's own thread is checked as before (torch's
            # compiled CUDA graphs capture the same way).
            with torch.cuda.graph(forward, pool=self.pool, stream=self.stream, capture_error_mode=CAPTURE_MODE):
                loss_sum, num_targets = self._forward(model, pair)
            if self.pool is None:
                self.pool = forward.pool()
            pair.upstream = torch.zeros((), dtype=loss_sum.dtype, device=device)
            with torch.cuda.graph(backward, pool=self.pool, stream=self.stream, capture_error_mode=CAPTURE_MODE):
                loss_sum.backward(pair.upstream)
        except RuntimeError as error:
            # Not a fallback to eager: after a failed capture, later CUDA work in the process can
            # go wrong (seen on an H100, train/graphed_step.py), so the cause is raised.
            raise LoopGraphError(f"CUDA graph capture of a training forward failed: {str(error).splitlines()[0]}. "
                                 "Something in the forward or backward waits for the GPU (a .item(), a hook); "
                                 "set model.cuda_graphs = False to train without graphs") from error
        finally:
            self.busy = False
        pair.forward, pair.backward = forward, backward
        pair.loss_sum, pair.num_targets = loss_sum.detach(), num_targets.detach()
        return pair
