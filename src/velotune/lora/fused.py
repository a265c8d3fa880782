"""Fused LoRA blocks: the q/k/v (or any group of projections reading one input), o and MLP
projections of a decoder layer as autograd Functions with hand-written backward passes.

Why: with one `LoraLinear` per projection, autograd keeps, per projection, its own copy of the
input (the adapter's input is cast to the adapter's dtype; under autocast cast back again), and the
MLP keeps gate, up, act(gate) and h. Here a block keeps its input once, the small X·A products,
and for the MLP the gate and up activations; everything else is recomputed or never built:
- The low-rank path is always (X·A^T)·B^T, r columns wide; the product B·A is never formed. The
  A matrices of projections that share an input are stacked, so X is read once for all of them,
  in the forward (X·A^T) and in the backward (dA = dXA^T·X).
- The adapter output s·(XA)·B^T is written first and the base product is added onto it by the base
  GEMM itself (beta = 1, read in its epilogue): no [tokens, out] temporary for the low-rank term
  and no extra pass over the output to add it; dX likewise starts from the adapters' term. In the
  MLP, the gate's and up's terms (and in the backward dh's) are not written at all: the GLU kernels
  add them as they read the tensors (`kernels.glu_low_rank`), so g and u are saved without them.
- Frozen base weights get no gradient; a 4-bit base is dequantized in the forward and again in
  the backward, never kept. Weights are saved as the parameters themselves (no copy); casts to the
  compute dtype happen in forward and again in backward. The adapters are saved as the one
  tensor the Function was given (see below).
- MLP: g and u are saved, h = act(g)·u is not (it is the MLP's third [tokens, intermediate]
  tensor). Saving g and u rather than only X costs two such tensors but spares re-running the gate
  and up matmuls (4·N·H·I FLOPs, about a third of the MLP's forward) on top of what checkpointing
  already recomputes. In the backward one elementwise pass (`kernels.glu_backward_inplace`) writes h
  over dh, dg over g and du over u: every buffer is dead by the time it is overwritten, so the
  MLP backward allocates one [tokens, intermediate] tensor (dh) instead of four. h in the forward
  and dh in the backward are made a chunk of rows at a time (`_row_chunks`), so beside g and u
  the MLP holds one chunk of that size, not a third whole tensor.

A block's adapters enter its Function as one tensor, all its A and B matrices cast to the
compute dtype at once and carved into views inside (`lora/block_adapters.py` says why and how).

Precision: everything runs in one compute dtype, autocast's when it is on, else the input's (the
dtype of the frozen base). Adapters (float32, as PEFT keeps them) are cast to it outside the
Function, so autograd's cast returns their gradients in float32: the numerics of autocast's matmul
on the unfused path. Without autocast, a bf16 base with float32 adapters therefore runs its
low-rank products in bf16 here, where the unfused path runs them in float32.

Dispatch (`project`, `mlp`): the fused path runs when autograd is recording (or inside
`fused_unrecorded`, a checkpointed layer's first forward), kernels are enabled
(`VELOTUNE_KERNELS=0` turns it off with the Triton kernels), every projection of the block is a
frozen nn.Linear / `Linear4bit`, or a `LoraLinear` over one with no dropout and no DoRA, and at
least one adapter is active. Anything else (dropout, DoRA, trainable bases, forward hooks, a base
whose dtype differs from the input without autocast) takes the modules' own forward unchanged.
On CUDA the GLU and its in-place backward are Triton kernels; elsewhere their references.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from velotune import kernels
from velotune.kernels.float32_sum import add_matmul_float32
from velotune.lora.block_adapters import Projection, a_of, b_of, combined, layout, stacked_a
from velotune.lora.layers import LoraLinear
from velotune.quant.linear4bit import Linear4bit

# Each projection passes two tensors to the Functions, in this order (None where absent); its
# adapter's A and B arrive in the block's one adapters tensor (`lora/block_adapters.py`).
WEIGHT, BIAS = range(2)
PER_PROJECTION = 2
# The most bytes of one [tokens, intermediate] chunk the MLP makes besides g and u (`_row_chunks`).
_MLP_CHUNK_BYTES = 64 * 2**20


def project(x: torch.Tensor, *modules: nn.Module, output_needed: bool = True) -> tuple[torch.Tensor, ...]:
    """`tuple(m(x) for m in modules)`, computed by one `LoraProjections` when the modules allow it.
    `output_needed=False` (a checkpoint's recomputation): the fused block saves what it always
    saves and returns placeholders of the outputs' shapes without running the base matmuls."""
    parts = _plan(x, modules, shared=len(modules))
    if parts is None:
        return tuple(m(x) for m in modules)
    return _run(LoraProjections, x, parts, (output_needed,))


def mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, activation: str,
        output_needed: bool = True) -> torch.Tensor:
    """`down(glu(gate(x), up(x)))`, computed by one `LoraMLP` when the modules allow it.
    `output_needed=False` is for a checkpoint's recomputation, which keeps what the forward saves
    and throws the output away: the fused block then skips the GLU and the down projection and
    returns a placeholder of the output's shape (the unfused modules save the down projection's
    input, so they run whole)."""
    parts = _plan(x, (gate, up, down), shared=2)
    if parts is None:
        return down(kernels.glu(gate(x), up(x), activation))
    return _run(LoraMLP, x, parts, (activation, output_needed))[0]


class LoraProjections(torch.autograd.Function):
    """y_i = X W_i^T + b_i + s_i (X A_i^T) B_i^T for projections i sharing the input X [N, in].
    Saves X, X·A^T (all adapters stacked) and the adapters; returns one output per projection."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: tuple[Projection, ...], output_needed: bool,  # type: ignore[override]
                adapters: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        members = range(len(plan))
        xa = x @ stacked_a(adapters, plan, members).t()
        ctx.plan = plan
        ctx.save_for_backward(x, xa, adapters, *_weights(plan, tensors))
        if not output_needed:
            return tuple(_placeholder(x, p.out_features) for p in plan)
        spans = _spans(plan)
        return tuple(_projection(x, plan, tensors, i, xa[:, spans[i]], b_of(adapters, p)) if p.adapted
                     else _projection(x, plan, tensors, i) for i, p in enumerate(plan))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        plan: tuple[Projection, ...] = ctx.plan
        x, xa, adapters, *weights = ctx.saved_tensors
        members = range(len(plan))
        d_adapters = torch.empty_like(adapters) if ctx.needs_input_grad[3] else None
        with _autocast_off(x):
            _b_grads(plan, members, grads, xa, d_adapters)
            dxa = _xa_grads(plan, members, grads, adapters)
            dx = _input_grad(ctx.needs_input_grad[0], plan, members, weights, grads, x.dtype, dxa,
                             stacked_a(adapters, plan, members))
            _a_grads(plan, members, x, dxa, d_adapters)
        return (dx, None, None, d_adapters, *[None] * (PER_PROJECTION * len(plan)))


class LoraMLP(torch.autograd.Function):
    """down(glu(gate(X), up(X))) with LoRA on any of the three, for X [N, hidden]. Saves X, the
    stacked X·A^T of gate and up, g and u, and keeps h·A_down^T; h is recomputed in the backward.

    h·A_down^T ([N, r], 256 KiB at 8B micro-batch 4) is kept as a ctx attribute, outside the
    saved tensors: a checkpoint's recomputation (`output_needed=False`) does not make h, and
    torch's checkpoint requires it to save what the forward saved. The backward runs on the
    forward's graph, whose ctx holds it; being neither an input nor an output, it makes no cycle."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: tuple[Projection, ...], activation: str,  # type: ignore[override]
                output_needed: bool, adapters: torch.Tensor, *tensors: torch.Tensor | None) -> torch.Tensor:
        a_gu = stacked_a(adapters, plan, (0, 1))
        xa = None if a_gu is None else x @ a_gu.t()
        # g and u without their adapters' terms: the GLU adds those as it reads them (and the
        # backward's GLU again), so no [tokens, intermediate] tensor is read and rewritten for them.
        g, u = (_projection(x, plan, tensors, i) for i in (0, 1))
        ctx.plan, ctx.activation, ctx.spent, ctx.ha = plan, activation, False, None
        ctx.save_for_backward(x, xa, g, u, adapters, *_weights(plan, tensors))
        down = plan[2]
        if not output_needed:
            if _STATE.replaying is not None and down.adapted:   # this graph's backward reads h·A_down^T
                ctx.ha = _STATE.replaying.ha.pop(0)
            return _placeholder(x, down.out_features)
        bs = [b_of(adapters, p) for p in plan]
        a_down = a_of(adapters, down)
        terms = _glu_terms(plan, xa, bs)
        weight, bias = _base_weight(down, tensors, 2, x.dtype), _bias(tensors, 2, x.dtype)
        out = x.new_empty(x.shape[0], down.out_features)
        ha = x.new_empty(x.shape[0], down.rank) if down.adapted else None
        for rows in _row_chunks(g):   # h for one chunk of rows at a time
            h = kernels.glu_low_rank(g[rows], u[rows], activation, *(_rows_of(t, rows) for t in terms))
            if ha is not None:
                torch.mm(h, a_down.t(), out=ha[rows])
                _adapter_then_base(out[rows], h, weight, bias, ha[rows], bs[2], down.scale)
            elif bias is None:
                torch.mm(h, weight.t(), out=out[rows])
            else:
                torch.addmm(bias, h, weight.t(), out=out[rows])
            del h
        ctx.ha = ha
        if ha is not None and _STATE.recording is not None and not torch.is_grad_enabled():
            _STATE.recording.ha.append(ha)   # for the recomputation's graph (`recomputation_backpropagated`)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        if ctx.spent:
            raise RuntimeError("LoraMLP: backward through the same graph twice (retain_graph=True). The fused "
                               "LoRA MLP reuses its saved activations as gradient buffers; set VELOTUNE_KERNELS=0 "
                               "to use the unfused path for double backward passes")
        ctx.spent = True
        plan: tuple[Projection, ...] = ctx.plan
        x, xa, g, u, adapters, *weights = ctx.saved_tensors
        ha = ctx.ha
        bs = [b_of(adapters, p) for p in plan]
        a_gu, a_down = stacked_a(adapters, plan, (0, 1)), a_of(adapters, plan[2])
        d_adapters = torch.empty_like(adapters) if ctx.needs_input_grad[4] else None
        with _autocast_off(x):
            down = plan[2]
            dout = dout.contiguous()
            dha = None
            if down.adapted:
                dha = _scaled_mm(dout, bs[2], down.scale)
                if d_adapters is not None and down.b_trained:
                    _scaled_mm(dout.t(), ha, down.scale, out=b_of(d_adapters, down))
            gate_term, up_term = _glu_terms(plan, xa, bs)
            # d(X A^T) of the gate and up adapters, made by the GLU pass as it writes dg and du
            dxa = None if xa is None else torch.empty_like(xa)
            need_da = down.adapted and d_adapters is not None and down.a_trained
            # the A gradient summed over chunks in float32 and rounded once, as one matmul would
            da_down = torch.zeros(down.rank, g.shape[1], dtype=torch.float32, device=g.device) if need_da else None
            weight = _base_weight(down, weights, 2, x.dtype, stride=1)
            for rows in _row_chunks(g):   # dh (then h over it) for one chunk of rows at a time
                dh = dout[rows] @ weight
                # dh's adapter term is added inside the GLU pass, as are g's and u's:
                # dh <- h, g <- dg, u <- du for these rows
                dh_term = kernels.LowRank(dha[rows], a_down, 1.0) if down.adapted else None
                kernels.glu_backward_inplace(dh, g[rows], u[rows], ctx.activation, gate_term=_rows_of(gate_term, rows),
                                             up_term=_rows_of(up_term, rows), dh_term=dh_term,
                                             xa_grads_out=None if dxa is None else dxa[rows])
                if da_down is not None:
                    add_matmul_float32(da_down, dha[rows].t(), dh)
                del dh
            del weight
            if da_down is not None:
                a_of(d_adapters, down).copy_(da_down)
            dgu = (g, u)
            dx = _input_grad(ctx.needs_input_grad[0], plan, (0, 1), weights, dgu, x.dtype, dxa, a_gu)
            _b_grads(plan, (0, 1), dgu, xa, d_adapters)
            _a_grads(plan, (0, 1), x, dxa, d_adapters)
        return (dx, None, None, None, d_adapters, *[None] * (PER_PROJECTION * 3))


# ---- shared pieces of the two Functions -------------------------------------------------------

def _slot(tensors: Sequence[torch.Tensor | None], i: int, kind: int) -> torch.Tensor | None:
    return tensors[PER_PROJECTION * i + kind]


def _base_weight(p: Projection, tensors: Sequence[torch.Tensor | None], i: int, dtype: torch.dtype,
                 stride: int = PER_PROJECTION) -> torch.Tensor:
    """Projection i's frozen weight [out, in] in `dtype` (a temporary for 4-bit bases and casts)."""
    if p.quantized is not None:
        return p.quantized.dequantized_weight(dtype)
    return tensors[stride * i].to(dtype)


def _bias(tensors: Sequence[torch.Tensor | None], i: int, dtype: torch.dtype) -> torch.Tensor | None:
    bias = _slot(tensors, i, BIAS)
    return None if bias is None else bias.to(dtype)


def _spans(plan: Sequence[Projection]) -> dict[int, slice]:
    """Column range of each adapted projection in the stacked X·A^T."""
    spans, start = {}, 0
    for i, p in enumerate(plan):
        if p.adapted:
            spans[i] = slice(start, start + p.rank)
            start += p.rank
    return spans


def _projection(x: torch.Tensor, plan: Sequence[Projection], tensors: Sequence[torch.Tensor | None], i: int,
                xa: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
    """X W_i^T + b_i, plus s_i xa B_i^T when projection i's adapter term is given (xa = X A_i^T)."""
    p = plan[i]
    weight, bias = _base_weight(p, tensors, i, x.dtype), _bias(tensors, i, x.dtype)
    if xa is None:
        return F.linear(x, weight, bias)
    y = x.new_empty(x.shape[0], p.out_features)
    return _adapter_then_base(y, x, weight, bias, xa, b, p.scale)


def _adapter_then_base(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       xa: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """out = x W^T + bias + scale xa B^T, the rank-r term written first and the base product added
    onto it by the base GEMM itself (beta = 1, read in its epilogue).

    Why this order: made after the base product, the term was an in-place addmm that read and
    rewrote the whole [tokens, out] output for a rank-16 product (59 us per 8,192 x 4,096 output
    on an H100, three per 8B layer's forward); the big GEMM reads it in its epilogue for almost
    nothing. The sum is also rounded once, not twice."""
    if bias is None:
        _scaled_mm(xa, b.t(), scale, out=out)
    else:
        torch.addmm(bias, xa, b.t(), alpha=scale, out=out)
    return out.addmm_(x, weight.t())


def _placeholder(x: torch.Tensor, cols: int) -> torch.Tensor:
    """A [rows of x, cols] stand-in for an output a recomputation discards: one element, expanded,
    never written (nothing reads it: torch's checkpoint stops the recomputation once the saved
    tensors are made, and without that early stop the layer's output is thrown away)."""
    return x.new_empty(1).expand(x.shape[0], cols)


def _row_chunks(t: torch.Tensor) -> list[slice]:
    """Row ranges of a [tokens, intermediate] tensor such that one range of it takes at most
    `_MLP_CHUNK_BYTES`, as even as whole 128-row tiles allow (one range when it all fits).

    Why: the MLP makes a third tensor of that size besides the saved g and u, h in the forward and
    dh in the backward. Made a chunk of rows at a time, it costs one chunk: at Llama-3.1-8B
    micro-batch 4 (8,192 x 14,336 bf16, 224 MiB each) that is 56 instead of 224 MiB at the
    layer's peak, which is the step's peak once checkpoints are offloaded. The matmuls keep
    2,048 rows or more, enough to fill an H100."""
    n = t.shape[0]
    pieces = -(-t[:1].numel() * n * t.element_size() // _MLP_CHUNK_BYTES)
    if pieces <= 1 or n <= 128:
        return [slice(0, n)]
    rows = -(-n // pieces)
    rows = -(-rows // 128) * 128
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def _rows_of(term: kernels.LowRank | None, rows: slice) -> kernels.LowRank | None:
    """A low-rank term restricted to some rows of the tensor it completes."""
    return None if term is None else kernels.LowRank(term.xa[rows], term.right, term.scale)


def _glu_terms(plan: Sequence[Projection], xa: torch.Tensor | None, bs: Sequence[torch.Tensor | None],
               ) -> tuple[kernels.LowRank | None, kernels.LowRank | None]:
    """The gate's and up's adapter terms s (X A^T) B^T as the GLU kernels take them (None if not adapted)."""
    spans = _spans(plan)
    # B^T made contiguous here, once per call: the kernels want it row-major, and every row chunk
    # of the MLP reuses it (copied per chunk, it was 600 small copies per 8B step).
    return tuple(kernels.LowRank(xa[:, spans[i]], bs[i].t().contiguous(), plan[i].scale) if plan[i].adapted
                 else None for i in (0, 1))  # type: ignore[return-value]


def _weights(plan: Sequence[Projection], tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The base weights as given, which the backward reads (parameters, so saving them copies
    nothing; None for 4-bit bases)."""
    return [_slot(tensors, i, WEIGHT) for i in range(len(plan))]


def _input_grad(needed: bool, plan: Sequence[Projection], members: Sequence[int],
                weights: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor], dtype: torch.dtype,
                dxa: torch.Tensor | None, a_all: torch.Tensor | None) -> torch.Tensor | None:
    """dX = d(XA^T) A (all adapters in one matmul) + sum_i dY_i W_i. The rank-r term comes first
    and each base product is accumulated onto it by its GEMM (beta = 1): added last, it read and
    rewrote the whole [tokens, in] dX for a rank-r product (see `_adapter_then_base`)."""
    if not needed:
        return None
    dx = None if dxa is None else dxa @ a_all
    for k, i in enumerate(members):
        # The weight inline, not in a loop variable: a dequantized 4-bit weight (a [14336, 4096]
        # bf16 temporary for an 8B MLP, 112 MiB) is then freed before the next one is made.
        if dx is None:
            dx = grads[k] @ _base_weight(plan[i], weights, i, dtype, stride=1)
        else:
            dx.addmm_(grads[k], _base_weight(plan[i], weights, i, dtype, stride=1))
    return dx


def _b_grads(plan: Sequence[Projection], members: Sequence[int], grads: Sequence[torch.Tensor],
             xa: torch.Tensor | None, d_adapters: torch.Tensor | None) -> None:
    """Write each needed dB_i = s dY_i^T (X A_i^T) into its place in `d_adapters`."""
    if d_adapters is None:
        return
    spans = _spans(plan)
    for k, i in enumerate(members):
        if plan[i].adapted and plan[i].b_trained:
            _scaled_mm(grads[k].t(), xa[:, spans[i]], plan[i].scale, out=b_of(d_adapters, plan[i]))


def _xa_grads(plan: Sequence[Projection], members: Sequence[int], grads: Sequence[torch.Tensor],
              adapters: torch.Tensor) -> torch.Tensor | None:
    """The stacked d(X A^T) = s dY_i B_i of the adapted members (None when none is adapted), each
    product written straight into its columns (no concatenation pass)."""
    adapted = [(k, i) for k, i in enumerate(members) if plan[i].adapted]
    if not adapted:
        return None
    spans = _spans(plan)
    first = grads[adapted[0][0]]
    dxa = first.new_empty(first.shape[0], sum(plan[i].rank for _, i in adapted))
    for k, i in adapted:
        _scaled_mm(grads[k], b_of(adapters, plan[i]), plan[i].scale, out=dxa[:, spans[i]])
    return dxa


def _a_grads(plan: Sequence[Projection], members: Sequence[int], x: torch.Tensor, dxa: torch.Tensor | None,
             d_adapters: torch.Tensor | None) -> None:
    """dA = d(XA^T)^T X for all adapters of `members` in one matmul, written where their stacked A
    lies in `d_adapters` (see `block_adapters.stacked_a`)."""
    if dxa is None or d_adapters is None:
        return
    if any(plan[i].adapted and plan[i].a_trained for i in members):
        torch.mm(dxa.t(), x, out=stacked_a(d_adapters, plan, members))


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """scale * (a @ b) as one matmul, the scale applied by the GEMM (its alpha) before the single
    rounding: no second pass over the product to scale it. `out` may be a column slice of a wider
    tensor (BLAS writes it through its leading dimension)."""
    if out is None:
        out = a.new_empty(a.shape[0], b.shape[1])
    return out.addmm_(a, b, beta=0, alpha=scale)


def _autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The Functions choose their dtypes themselves; autocast (on for the forward when the caller
    trains under it, and on in the backward when `backward()` is called inside the autocast block)
    must not recast their matmuls."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


# ---- dispatch -------------------------------------------------------------------------------

def _frozen_linear(module: nn.Module) -> nn.Module | None:
    """`module` when it is a plain frozen linear the Functions can run (exact types: a subclass may
    change the forward), else None."""
    if type(module) not in (nn.Linear, Linear4bit) or _hooked(module):
        return None
    if any(p is not None and p.requires_grad for p in module._parameters.values()):
        return None   # (its own parameters, as `parameters(recurse=False)` lists them, without the generator's cost)
    return module


def _hooked(module: nn.Module) -> bool:
    """Forward hooks would be skipped by the fused path, so a hooked module keeps its own forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _describe(module: nn.Module) -> tuple[nn.Module, LoraLinear | None] | None:
    """(frozen base, the active LoraLinear around it or None) when `module` can be fused."""
    if type(module) is LoraLinear:
        if _hooked(module):
            return None
        base = _frozen_linear(module.base_layer)
        if base is None:
            return None
        if not module.active:
            return base, None
        if module.lora_magnitude_vector is not None or not isinstance(module.lora_dropout, nn.Identity):
            return None
        return base, module
    base = _frozen_linear(module)
    return None if base is None else (base, None)


@dataclass
class _Parts:
    plan: tuple[Projection, ...]
    bases: list[nn.Module]
    pieces: list[torch.Tensor]    # what makes the block's adapters tensor (`block_adapters.layout`)
    dtype: torch.dtype


@dataclass
class Unrecorded:
    """What a checkpointed layer's unrecorded forward keeps for its recomputation, in call order:
    each block's plan (`_plan`, None where the modules ran their own forwards), so the
    recomputation does not work them out again, and each fused MLP's h·A_down^T ([tokens, r]),
    which its backward reads and a recomputation does not make."""

    plans: list = field(default_factory=list)
    ha: list = field(default_factory=list)


class _State(threading.local):
    recording: Unrecorded | None = None   # inside `fused_unrecorded`
    replaying: Unrecorded | None = None   # inside `recomputation_backpropagated` (a copy, consumed)


_STATE = _State()


@contextlib.contextmanager
def fused_unrecorded() -> Iterator[Unrecorded]:
    """Within the block the fused Functions run although autograd records nothing: the first
    forward of a checkpointed layer (models/layer_checkpoint.py) must compute what its
    recomputation under autograd computes, with the same kernels, to the same bits. Yields what
    the blocks keep for the recomputation (hand it to `recomputation_backpropagated`)."""
    outer, _STATE.recording = _STATE.recording, Unrecorded()
    try:
        yield _STATE.recording
    finally:
        _STATE.recording = outer


@contextlib.contextmanager
def recomputation_backpropagated(kept: Unrecorded) -> Iterator[None]:
    """Within the block a checkpoint's recomputation builds the graph the backward runs on
    (models/layer_checkpoint.py; torch's checkpoint runs the forward's graph instead): the blocks
    take the plans their unrecorded forward made, and the fused MLPs, which skip their down
    projection there, its h·A_down^T, in the same order."""
    outer, _STATE.replaying = _STATE.replaying, Unrecorded(list(kept.plans), list(kept.ha))
    try:
        yield
    finally:
        _STATE.replaying = outer


def _plan(x: torch.Tensor, modules: Sequence[nn.Module], shared: int) -> _Parts | None:
    """How the Functions run `modules` (None: take their own forwards); the first `shared` read
    the same input, so their A matrices are stacked. A recomputation takes the plan its unrecorded
    forward made (`recomputation_backpropagated`), which that forward keeps (`fused_unrecorded`)."""
    replaying, recording = _STATE.replaying, _STATE.recording
    if replaying is not None and replaying.plans:
        return replaying.plans.pop(0)
    parts = _worked_out_plan(x, modules, shared, recording is not None)
    if recording is not None:
        recording.plans.append(parts)
    return parts


def _worked_out_plan(x: torch.Tensor, modules: Sequence[nn.Module], shared: int, unrecorded: bool) -> _Parts | None:
    if not ((torch.is_grad_enabled() or unrecorded) and kernels.kernels_enabled() and x.is_floating_point()):
        return None
    described = [_describe(m) for m in modules]
    if any(d is None for d in described) or all(d[1] is None for d in described):
        return None
    bases = [d[0] for d in described]
    adapters = [d[1] for d in described]
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        # nn.Linear needs a weight of the input's dtype: a mismatch keeps the unfused path (and its error).
        if any(type(base) is nn.Linear and base.weight.dtype != x.dtype for base in bases):
            return None
        dtype = x.dtype
    plan, pieces = layout(bases, adapters, shared)
    return _Parts(plan, bases, pieces, dtype)


def _run(fn: type[torch.autograd.Function], x: torch.Tensor, parts: _Parts,
         extra: tuple) -> tuple[torch.Tensor, ...]:
    """Apply `fn` to the block, its adapters as one tensor in the compute dtype."""
    tensors: list[torch.Tensor | None] = []
    with _autocast_off(x):
        x2 = x.reshape(-1, x.shape[-1]).to(parts.dtype)
        for base in parts.bases:
            tensors.append(None if type(base) is Linear4bit else base.weight)
            tensors.append(base.bias)
        adapters = combined(parts.pieces, parts.dtype)
        outputs = fn.apply(x2, parts.plan, *extra, adapters, *tensors)
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    lead = x.shape[:-1]
    return tuple(y.view(*lead, y.shape[-1]) for y in outputs)

