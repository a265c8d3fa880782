"""Where each checkpointed decoder-layer input lives between the forward and the backward: in
pinned host memory or on the GPU, and in how many pieces (a plan of "what fits where").

With checkpointing at decoder-layer boundaries and offloaded checkpoints
(`velotune.models.offload`), each layer keeps one [tokens x hidden] input until its backward:
Llama-3.1-8B at 500,000 tokens keeps 3.8 GiB per layer, 122 GiB for its 32 layers, which a host of
128 GiB (about 116 GiB of it free for pinning) cannot hold, and the GPU, with about 60 GiB of
working set at that length, cannot hold either. Split, both can: the host takes as many whole
inputs as it has room for, and the GPU keeps the rest (2 to 3 layers' inputs at 500,000 tokens).

Pieces: a layer checkpointed in three pieces (`Transformer`: the q/k/v projections, attention
through o_proj, the MLP half) parks its input, q, k, v and the residual between its halves
(2h + q + 2kv values per token, 3.5x the input for Llama-3.1-8B), and its recomputation then skips
the base matmuls of the attention; two pieces park 2h. Finer pieces only save matmuls, and cost
GPU memory too (two layers' parked tensors are on the GPU at once in the backward: 56 KB a token
in three pieces against 16 KB whole for Llama-3.1-8B), so they are taken only when the host holds
every parked layer so and the GPU has room for that in-flight cost, all layers alike (a mix would
pay the GPU cost of the finest for part of the saving), and only while sequences are short enough
that the matmuls pieces spare cost more than the attention kernel (below about 10,000 tokens for
Llama-3.1-8B).

Kept attention outputs: past that length a whole parked layer keeps its attention output and
log-sum-exp beside its input instead (`models/kept_attention.py`; 8 KB a token for Llama-3.1-8B),
so its recomputation runs no attention kernel, for as many layers as the host's room left after
the inputs allows (25 of 32 at 262,144 tokens on a host with 122 GiB available, none at 500,000).

Which layers stay on the GPU: the last ones. Their backward comes first, so their inputs are
freed first; and the host-parked ones, all earlier, are prefetched one layer ahead as before.

This module is arithmetic on config fields and byte counts only, so the memory estimator
(`velotune.models.long_context`) and the decoder (`velotune.models.transformer`) use the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from velotune.models.config import ModelConfig

GIB = 2**30
F32 = 4
HOST, GPU, NONE = "host", "gpu", "none"
# Values each checkpointed input in host memory brings in flight on the GPU at once: the layer
# being recomputed and the one prefetched ahead of it (models/offload.py).
IN_FLIGHT_LAYERS = 2


def parked_per_token(config: ModelConfig, pieces: int) -> int:
    """Values per token one layer parks when checkpointed in `pieces` pieces: 1, its input (h);
    2, its input and the residual between its halves (2h); 3, those and q, k, v (2h + q + 2kv)."""
    h = config.hidden_size
    if pieces == 1:
        return h
    if pieces == 2:
        return 2 * h
    if pieces == 3:
        return 2 * h + (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    raise ValueError(f"a layer is checkpointed in 1, 2 or 3 pieces, not {pieces}")


def parked_count(pieces: int) -> int:
    """How many tensors a layer checkpointed in `pieces` pieces parks (input; + residual; + q, k, v)."""
    return {1: 1, 2: 2, 3: 5}[pieces]


@dataclass(frozen=True)
class Placement:
    """Per decoder layer: where its checkpointed input lives (`HOST`, `GPU`, or `NONE` when the
    layer is not checkpointed) and in how many pieces it is checkpointed (1 unless parked in host
    memory). Bytes are for one forward of `tokens` tokens."""

    where: tuple[str, ...]
    pieces: tuple[int, ...]
    kept: tuple[bool, ...]   # layers whose attention output is parked too (models/kept_attention.py)
    host_bytes: int          # pinned host memory the parked inputs (and kept outputs) take
    gpu_bytes: int           # checkpointed inputs kept on the GPU for the whole step
    in_flight_bytes: int     # host-parked inputs on the GPU at once in the backward (two layers' worth)
    host_room: int | None    # what the host had room for when planned (None: not asked)

    @property
    def offloaded(self) -> int:
        """Layers whose inputs go to host memory (the first ones)."""
        return self.where.count(HOST)

    @property
    def kept_on_gpu(self) -> int:
        return self.where.count(GPU)

    @property
    def fits_host(self) -> bool:
        return self.host_room is None or self.host_bytes <= self.host_room

    def describe(self) -> str:
        host = [p for w, p in zip(self.where, self.pieces) if w == HOST]
        split = ", ".join(f"{host.count(p)} in {p} piece{'s' * (p > 1)}" for p in (3, 2, 1) if host.count(p))
        kept = f", {sum(self.kept)} with their attention output" if any(self.kept) else ""
        return (f"checkpoints: {self.offloaded} layer inputs in host memory ({split or 'none'}{kept}; "
                f"{self.host_bytes / GIB:.1f} GiB pinned), {self.kept_on_gpu} kept on the GPU "
                f"({self.gpu_bytes / GIB:.1f} GiB)")


def plan_placement(config: ModelConfig, tokens: int, itemsize: int, checkpointed: int, *, offload: bool,
                   host_room: int | None = None, kept_on_gpu: int | str = "auto",
                   gpu_room: int | None = None, keep_attention: bool = True, seq: int | None = None) -> Placement:
    """Where the first `checkpointed` layers' inputs go for a forward of `tokens` tokens of
    `itemsize` bytes per value.

    `offload` False: all on the GPU. Otherwise `kept_on_gpu` "auto" parks as many whole inputs in
    host memory as `host_room` bytes hold (all, when `host_room` is None) and keeps the rest, the
    last ones, on the GPU; an int keeps that many of the last on the GPU whatever the room (the
    offloader then refuses, naming the remedy, if the host cannot hold the others). When the host
    has room for every parked layer in three pieces, or else two, they are all parked so (see the
    module docstring), as long as the GPU has `gpu_room` bytes (None: no limit) for what finer
    pieces bring in flight beyond whole inputs; Gemma 2's sandwich norms read the MLP output, so
    its layers stay whole. Whole parked layers then keep their attention output too
    (`keep_attention`, plain causal attention only), first to last, as far as the host's room
    left over goes and the GPU has room for one more layer's output in flight. Where sequences
    (`seq` tokens each; default `tokens`) are long enough that the attention kernel a kept output
    spares costs more than the projections' matmuls pieces spare (`attention_outweighs_pieces`),
    kept outputs come first and no layer is split."""
    L = config.num_hidden_layers
    if not 0 <= checkpointed <= L:
        raise ValueError(f"checkpointed layers must be in [0, {L}], got {checkpointed}")
    if kept_on_gpu != "auto" and (isinstance(kept_on_gpu, bool) or not isinstance(kept_on_gpu, int)
                                  or kept_on_gpu < 0):
        raise ValueError(f"checkpoints_kept_on_gpu must be 'auto' or a whole number >= 0, got {kept_on_gpu!r}")
    per_layer = lambda pieces: tokens * itemsize * parked_per_token(config, pieces)  # noqa: E731
    whole = per_layer(1)
    if not offload:
        host = 0
    elif kept_on_gpu == "auto":
        host = checkpointed if host_room is None or whole == 0 else min(checkpointed, max(host_room, 0) // whole)
    else:
        host = max(checkpointed - kept_on_gpu, 0)
    pieces = 1
    keeping = keep_attention and attention_keepable(config)
    if host and not config.sandwich_norms and not (keeping and attention_outweighs_pieces(config, seq or tokens)):
        def room_for(p: int) -> bool:
            extra_in_flight = min(host, IN_FLIGHT_LAYERS) * (per_layer(p) - whole)
            return ((host_room is None or host * per_layer(p) <= host_room)
                    and (gpu_room is None or extra_in_flight <= gpu_room))
        pieces = next((p for p in (3, 2) if room_for(p)), 1)
    kept = 0
    per_kept = tokens * kept_attention_per_token(config, itemsize)
    if keeping and host and pieces == 1 and per_kept:
        spare = None if host_room is None else max(host_room - host * whole, 0)
        if gpu_room is None or per_kept <= gpu_room:
            kept = host if spare is None else min(host, spare // per_kept)
    where = tuple(HOST if i < host else GPU if i < checkpointed else NONE for i in range(L))
    return Placement(where=where, pieces=tuple(pieces if w == HOST else 1 for w in where),
                     kept=tuple(i < kept for i in range(L)),
                     host_bytes=host * per_layer(pieces) + kept * per_kept, gpu_bytes=(checkpointed - host) * whole,
                     in_flight_bytes=min(host, IN_FLIGHT_LAYERS) * per_layer(pieces) + (per_kept if kept else 0),
                     host_room=host_room)


def attention_outweighs_pieces(config: ModelConfig, seq: int) -> bool:
    """Whether a layer's causal attention forward over sequences of `seq` tokens (2 x seq x q
    FLOP a token) costs more than the base matmuls of its q, k, v and o projections (2 x h x
    (2q + 2kv) a token), which is what three pieces spare the recomputation: from about 10,000
    tokens on for Llama-3.1-8B. Past that, keeping the attention output spares more."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return seq * q > config.hidden_size * (2 * q + 2 * kv)


def attention_keepable(config: ModelConfig) -> bool:
    """Whether every layer's attention is the plain causal kind whose output a layer can keep
    (`models/kept_attention.py`): no soft-cap, sinks or sliding windows."""
    return (config.attn_logit_softcapping is None and not config.attention_sinks
            and not any(config.is_sliding(i) for i in range(config.num_hidden_layers)))


def kept_attention_per_token(config: ModelConfig, itemsize: int) -> int:
    """Bytes per token of one layer's kept attention output (`itemsize` per value) and its float32
    log-sum-exp."""
    return itemsize * config.num_attention_heads * config.head_dim + F32 * config.num_attention_heads
