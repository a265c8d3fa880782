"""A checkpointed decoder layer as one autograd node: its forward records no graph, and its
backward recomputes the layer under autograd and runs that small graph's backward.

Why: in an eager step that the host paces (a user's own loop at micro-batch 1, where the GPU is
busy about a third of the time), every autograd node and every saved tensor costs host time.
torch's non-reentrant checkpoint records the whole layer's graph in the forward (then throws its
saved tensors away through Python pack hooks) and records it again in the recomputation. Here
the forward runs under no_grad, with the same fused kernels (`lora.fused.fused_unrecorded`), so
its output has the same bits, and the recomputation's graph is the one the backward runs. The
kernel launches per layer stay 30/23/42 (forward/recompute/backward, benchmarks/op_census.py);
views and allocations fall by 3/9/8, and no pack or unpack hook runs. On this project's 2-core CPU
a host-bound step of a 32-layer toy LoRA model took 167.5 ms against 212.7 ms with torch's
checkpoint (medians, benchmarks/host_overhead.py, 2026-12-08: 1.27x; 1.37x once the recomputation
reused the forward's block plans, `lora.fused.Unrecorded`); on a GPU it is not yet measured.

What it keeps:
- the same recomputation: `checkpointing.recomputing()` is true while the layer runs again, so the
  fused MLP still skips its down projection, whose output only the residual add reads; the blocks
  take the plans their unrecorded forward made, and the MLP the h·A_down^T it kept ([tokens, r],
  as torch's checkpoint keeps it on the forward's graph); the layer returns its residual stream
  and MLP term apart (`defer=True`), and the backward starts from both with the incoming
  gradient, so no add is made for it;
- the RNG state (dropout draws the same numbers again) and the autocast state of the forward;
- gradients: the recomputed graph's backward accumulates the parameters' `.grad` itself and hands
  back the layer input's gradient. Layer 0's input (frozen embeddings) needs none, so the node
  hangs on an anchor tensor that requires grad and gets none.

Where it is not used (`applies`), torch's checkpoint runs as before (`checkpointing.run_checkpointed`):
inside a CUDA graph capture (graphs pay no host time, and their captures are verified with
torch's checkpoint); with a process group (DDP's hooks must see each parameter's gradient once,
from the outer backward); for a mixture-of-experts layer (its router statistics feed a loss
outside the layer); with offloaded inputs (their hooks are torch checkpoint's).
`torch.autograd.grad` sees no parameter inside such a layer (as with torch's reentrant
checkpoint): asked for one, it says it was not used; asked for something before the layers (the
input embeddings), it gets that gradient, and no parameter's `.grad` changes.
"""
from __future__ import annotations

import torch
from torch import nn

from velotune.kernels.dispatch import capturing
from velotune.lora.fused import fused_unrecorded, recomputation_backpropagated
from velotune.models.checkpointing import recomputation
from velotune.models.moe import MoE
from velotune.models.rng_replay import RngStates

_ANCHORS: dict[torch.device, torch.Tensor] = {}


def applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `checkpointed_layer` may run `layer` (see the module docstring)."""
    return (torch.is_grad_enabled() and not capturing(x)
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())
            and not isinstance(layer.mlp, MoE))


def checkpointed_layer(layer: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    """`layer(x, *args)` (a `DecoderLayer`: cos, sin, mask, cache, mlp_chunk), checkpointed."""
    anchor = _ANCHORS.get(x.device)
    if anchor is None:
        anchor = _ANCHORS[x.device] = torch.empty(0, device=x.device, requires_grad=True)
    return _CheckpointedLayer.apply(layer, args, anchor, x)


class _CheckpointedLayer(torch.autograd.Function):

    @staticmethod
    def forward(ctx, layer: nn.Module, args: tuple, anchor: torch.Tensor, x: torch.Tensor):  # type: ignore[override]
        ctx.layer, ctx.args = layer, args
        ctx.rng = RngStates.of(x.device)
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                        torch.is_autocast_cache_enabled())
        ctx.save_for_backward(x)
        with fused_unrecorded() as kept:
            out = layer(x, *args)
        ctx.kept = kept   # the fused MLPs' h·A_down^T ([tokens, r]; torch's checkpoint keeps them too)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        needs_input = ctx.needs_input_grad[3]
        inp = x.detach().requires_grad_(needs_input)
        device, enabled, dtype, cache = ctx.autocast
        with torch.enable_grad(), ctx.rng.replayed(), recomputation(), \
                recomputation_backpropagated(ctx.kept), \
                torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache):
            outputs = ctx.layer(inp, *ctx.args, defer=True)   # (residual stream, MLP term): no add
        roots = [out for out in outputs if out.requires_grad]
        if not roots:
            return None, None, None, None
        if not torch.autograd._is_checkpoint_valid():
            # Inside torch.autograd.grad (or backward(inputs=...)): only the input's gradient is
            # handed on, and no parameter's .grad is touched (see the module docstring).
            found = torch.autograd.grad(roots, inp, [grad] * len(roots), allow_unused=True) if needs_input else (None,)
            return None, None, None, found[0]
        torch.autograd.backward(roots, [grad] * len(roots))
        return None, None, None, inp.grad if needs_input else None

