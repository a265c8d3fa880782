"""The MLP applied to the sequence in chunks, forward and backward, so that its [tokens x
intermediate] tensors exist for one chunk at a time.

Llama-3.1-8B's MLP widens 4096 to 14336: gate, up, act(gate) * up and their gradients are
3.5x the residual stream each. At 350,000 tokens one of them is 9.6 GiB, so even with every layer
checkpointed the layer being recomputed would need tens of GiB for its MLP alone. The MLP acts on
each token independently, so running it on chunks of tokens gives the same result.

`TiledMLP` is an autograd Function: its forward runs the MLP chunk by chunk without recording a
graph and keeps only its input; its backward recomputes each chunk under `enable_grad` and takes
the gradients of that chunk (input and the MLP's trainable parameters) with `autograd.grad`,
adding the parameter gradients over chunks and returning them as the gradients of the Function's
parameter inputs. Returning them, rather than running a nested `backward()` into `.grad`, keeps
`torch.autograd.grad` and DDP's gradient hooks working. The MLP module is opaque to this: a plain
`MLP`, LoRA-wrapped projections, or a fused LoRA block all work, as long as it is token-wise.

Autocast and RNG (LoRA dropout) are recorded in the forward and replayed in the backward so the
recomputation matches the forward exactly. Inside a checkpointed layer the MLP forward runs one
extra time (the checkpoint's recomputation runs this Function's forward again); at the lengths
where tiling switches on, attention dominates the step, so that costs a few percent.
"""
from __future__ import annotations

import torch
from torch import nn

from velotune.models.rng_replay import RngStates

# Automatic tiling (mlp_chunk_tokens None): chunks of AUTO_CHUNK_TOKENS once a forward has more
# than AUTO_MIN_TOKENS tokens. Below that the [tokens x intermediate] tensors of one layer are a
# few GiB at most for 8B-class models and tiling would only add the extra MLP forward.
AUTO_CHUNK_TOKENS = 8192
AUTO_MIN_TOKENS = 2 * AUTO_CHUNK_TOKENS


def mlp_chunk_size(setting: int | None, tokens: int) -> int:
    """Tokens per MLP chunk for a forward over `tokens` tokens; 0 = run the MLP whole.
    `setting`: None = automatic, 0 = never tile, N > 0 = chunks of N tokens."""
    if setting is None:
        return AUTO_CHUNK_TOKENS if tokens > AUTO_MIN_TOKENS else 0
    if setting < 0:
        raise ValueError(f"mlp_chunk_tokens must be None, 0 or positive, got {setting}")
    return setting if 0 < setting < tokens else 0


def tiled_mlp(mlp: nn.Module, x: torch.Tensor, chunk: int, output_needed: bool = True) -> torch.Tensor:
    """`mlp(x)` for x [..., hidden], computed `chunk` tokens at a time (0: in one piece).
    `output_needed=False` (a checkpoint's recomputation, whose output is discarded): only what
    the backward reads is made, and the value returned is a placeholder of the output's shape;
    `mlp` must then take `output_needed` itself (`velotune.models.transformer.MLP` does). A module
    with `whole_sequence = True` (the experts: routing statistics span the sequence) runs whole."""
    tokens = x.numel() // x.shape[-1]
    if chunk <= 0 or tokens <= chunk or getattr(mlp, "whole_sequence", False):
        return mlp(x) if output_needed else mlp(x, output_needed=False)
    params = tuple(p for p in mlp.parameters() if p.requires_grad)
    if torch.is_grad_enabled() and (x.requires_grad or params):
        return TiledMLP.apply(mlp, chunk, output_needed, x, *params)
    return _run_chunks(mlp, x, chunk)


def _run_chunks(mlp: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The MLP over token chunks of x, written into one output (no concatenation copy)."""
    rows = x.reshape(1, -1, x.shape[-1])
    out: torch.Tensor | None = None
    for start in range(0, rows.shape[1], chunk):
        piece = mlp(rows[:, start:start + chunk])
        if out is None:
            out = piece.new_empty(1, rows.shape[1], piece.shape[-1])
        out[:, start:start + piece.shape[1]] = piece
    return out.view(*x.shape[:-1], out.shape[-1])


class TiledMLP(torch.autograd.Function):
    """mlp(x) by token chunks; the backward recomputes one chunk at a time (see module docstring)."""

    @staticmethod
    def forward(ctx, mlp: nn.Module, chunk: int, output_needed: bool, x: torch.Tensor,  # type: ignore[override]
                *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp, ctx.chunk, ctx.params = mlp, chunk, params
        device = x.device
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = RngStates.of(device)
        ctx.save_for_backward(x)
        if not output_needed:   # the backward reads only x: the chunks are not run at all
            # (the MLP's output joins the residual stream, so it is as wide as x)
            return x.new_zeros(1).expand(x.shape)
        return _run_chunks(mlp, x, chunk)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        mlp, chunk, params = ctx.mlp, ctx.chunk, ctx.params
        need_x = ctx.needs_input_grad[3]
        rows = x.detach().reshape(1, -1, x.shape[-1])
        grad_rows = grad_out.reshape(1, -1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if need_x else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with ctx.rng.replayed():   # same dropout masks as the forward, chunk by chunk
            for start in range(0, rows.shape[1], chunk):
                piece = rows[:, start:start + chunk].detach().requires_grad_(need_x)
                with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                    out = mlp(piece)
                wrt = ((piece,) if need_x else ()) + params
                found = torch.autograd.grad(out, wrt, grad_rows[:, start:start + chunk], allow_unused=True)
                if need_x:
                    grad_x[:, start:start + chunk] = found[0]
                    found = found[1:]
                for j, g in enumerate(found):
                    if g is not None:
                        grads[j] = g if grads[j] is None else grads[j] + g
        return (None, None, None, grad_x.view_as(x) if need_x else None, *grads)
