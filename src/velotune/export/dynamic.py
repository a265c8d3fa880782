"""`--quant dynamic` for GGUF: each decoder weight's type chosen by measured sensitivity, within the
file size of llama.cpp's Q4_K_M mix of the same model.

Q4_K_M gives every tensor of a kind the same type (more bits on attn_v and ffn_down of some
layers, by position alone). Here the bits go where the model's next-token distribution is most
sensitive to them, measured on calibration rows:

- sensitivity: the KL divergence of the quantized model's next-token distribution from the
  16-bit one grows, to second order, as 1/2 sum F_ij d_ij^2 over the weight errors d, with F the
  diagonal of the Fisher information. F is measured on the calibration rows with labels sampled
  from the model itself (the Fisher of its own distribution, which is what the KL expands), one
  row at a time: each linear's per-row gradient g^T x, squared and summed (forward hooks keep x,
  tensor hooks receive g; the weights themselves need no gradient, so adapters are left alone);
- candidates per weight: the k-quant ladder Q4_K, Q5_K, Q6_K, Q8_0 for rows of whole 256-value
  super-blocks, else Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (SmolLM2's 576-wide rows), each measured by
  quantizing the weight (round-to-nearest) and reading it back as llama.cpp does (gguf-py);
- allocation: every weight starts on its cheapest type; upgrades are taken in order of KL saved
  per byte along each weight's lower convex hull, while the file stays within the Q4_K_M size.
  Everything else (embedding, head, norms, routers, 3-D experts) keeps Q4_K_M's type.
The file is then written as any calibrated type is (`calibration.py`'s rounding).
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from torch import nn

from velotune.export.kquants import K_QUANTS
from velotune.export.progress import track
from velotune.models.calibration import is_decoder_linear
from velotune.models.transformer import Transformer

if TYPE_CHECKING:
    from velotune.export.gguf import GGUFTensor

Q = GGMLQuantizationType
LADDERS = ((256, (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)), (32, (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)))
FISHER_ROW_TOKENS = 512


def candidates(cols: int) -> tuple[Q, ...]:
    return next((ladder for block, ladder in LADDERS if cols % block == 0), ())


def nbytes(shape: Sequence[int], qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def round_trip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What llama.cpp reads back from `w` quantized to `qtype` (round-to-nearest)."""
    data = K_QUANTS[qtype].quantize(w) if qtype in K_QUANTS else quants.quantize(w, qtype)
    return quants.dequantize(data, qtype).reshape(w.shape)


def fisher_diagonals(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, seed: int = 0
                     ) -> dict[str, torch.Tensor]:
    """Hugging Face weight name of each decoder linear -> diagonal Fisher [out, in] (float32, CPU),
    from calibration rows (ids, positions [B, L]) split into rows of at most FISHER_ROW_TOKENS."""
    linears = {f"model.layers.{i}.{path}": module for i, layer in enumerate(model.model.layers)
               for path, module in layer.named_modules() if is_decoder_linear(path)}
    fisher: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            inputs[name] = args[0].detach()

            def grad(g: torch.Tensor) -> None:
                x = inputs[name]
                per_row = torch.einsum("bto,bti->boi", g.float(), x.float())
                fisher[name] = fisher.get(name, 0) + per_row.square().sum(dim=0).cpu()
            output.register_hook(grad)
        return hook

    embedded: list[torch.Tensor] = []

    def differentiable(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        embedded[:] = [output.detach().requires_grad_(True)]   # gradients start here, weights need none
        return embedded[0]

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    length = min(FISHER_ROW_TOKENS, ids.shape[1])
    cut = ids.shape[1] // length * length
    rows, row_positions = ids[:, :cut].reshape(-1, length), positions[:, :cut].reshape(-1, length)
    handles = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    handles.append(model.model.embed_tokens.register_forward_hook(differentiable))
    try:
        for index in track(range(rows.shape[0]), rows.shape[0], "Fisher of the calibration rows"):
            row, pos = rows[index:index + 1].to(device), row_positions[index:index + 1].to(device)
            with torch.enable_grad():
                logits = model(row, position_ids=pos).logits[0].float()
                sampled = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=generator)[:, 0]
                loss = torch.nn.functional.cross_entropy(logits, sampled, reduction="sum")
                torch.autograd.grad(loss, embedded)
            inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(linears) - set(fisher))
    if missing:
        raise RuntimeError(f"the Fisher pass never reached {missing[:3]}")
    return {f"{name}.weight": value for name, value in fisher.items()}


def choose_types(tensors: list[GGUFTensor], fisher: dict[str, torch.Tensor], budget: int,
                 layout: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, Q]:
    """GGUF tensor name -> type for the weights with a Fisher diagonal (the others keep theirs),
    the file's tensor bytes at most `budget`. `layout(hf_name, value)`: a Hugging Face tensor in
    the GGUF row order (llama.cpp's q/k interleaving), applied to the Fisher as to the weight."""
    chosen: dict[str, Q] = {}
    options: dict[str, list[tuple[int, float, Q]]] = {}
    used = 0
    for t in track(tensors, len(tensors), "sensitivity of each weight type"):
        ladder = candidates(t.shape[-1]) if t.source in fisher and len(t.shape) == 2 else ()
        if not ladder:
            used += t.nbytes
            continue
        w = t.read()
        f = layout(t.source, fisher[t.source]).numpy()
        points = [(nbytes(t.shape, q), 0.5 * float(np.sum(f * (w - round_trip(w, q)) ** 2)), q) for q in ladder]
        options[t.name] = hull(points)
        used += options[t.name][0][0]
        chosen[t.name] = options[t.name][0][2]
    heap = [(-_slope(o[0], o[1]), name, 1) for name, o in options.items() if len(o) > 1]
    heapq.heapify(heap)
    while heap:
        _, name, step = heapq.heappop(heap)
        o = options[name]
        extra = o[step][0] - o[step - 1][0]
        if used + extra > budget:
            continue          # does not fit; cheaper upgrades of other weights still may
        used += extra
        chosen[name] = o[step][2]
        if step + 1 < len(o):
            heapq.heappush(heap, (-_slope(o[step], o[step + 1]), name, step + 1))
    return chosen


def _slope(a: tuple[int, float, Q], b: tuple[int, float, Q]) -> float:
    """KL saved per byte from option a to the larger option b."""
    return (a[1] - b[1]) / (b[0] - a[0])


def hull(points: list[tuple[int, float, Q]]) -> list[tuple[int, float, Q]]:
    """The lower convex hull of (bytes, KL, type) from the cheapest: options that no mix of the
    others beats, so that KL saved per byte falls along it and a greedy walk is optimal."""
    points = sorted(points, key=lambda p: (p[0], p[1]))
    kept: list[tuple[int, float, Q]] = []
    for p in points:
        if kept and p[1] >= kept[-1][1]:
            continue          # larger and no better
        while len(kept) >= 2 and _slope(kept[-2], kept[-1]) <= _slope(kept[-1], p):
            kept.pop()
        kept.append(p)
    return kept
