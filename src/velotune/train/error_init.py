"""QLoRA adapters that start by cancelling the 4-bit rounding error (`lora_init: quant_error`).

Why: on the demo (SmolLM2-135M, 40 steps) plain QLoRA ends 4.4% above 16-bit LoRA, and 16-bit
LoRA trained on the *dequantized* NF4 base ends at exactly the QLoRA figure: the gap is what NF4
rounding took out of the base, which 40 steps of a zero-initialised adapter do not put back. So
each adapter starts as the part of that error it can hold instead of as zero (in the spirit of
LoftQ and CLoQ; our own code).

For a projection with original weight W and frozen dequantized 4-bit weight Q, E = W - Q. What
matters is the output error on real inputs X, ||X (E - F)^T||_F^2 = ||(E - F) L||_F^2 where
H = X^T X (+ damping) = L L^T (Cholesky). Because L is invertible, F has rank r exactly when F L
has, so the best rank-r F is (the rank-r truncated SVD of E L) L^{-1} (Eckart-Young in the
H-weighted norm). Its factors are then split as below, so that scale * B A = F.

How the fit is split into B and A matters as much as the fit: Adam moves every entry by about
the learning rate per step, so factors far from the usual sizes train at another effective rate.
Splitting the weighted SVD evenly, U sqrt(S) and sqrt(S) V^T L^{-1}, ties the split to the scale
of H (its token count); on the demo that ended at +8.7% over 16-bit LoRA, worse than no
compensation (+4.4%). Here A gets orthonormal rows scaled to the row norm of the default
kaiming-uniform A (sqrt(1/3)) and B the rest, so B A trains like a default adapter that has taken
a few steps: +3.43% at damping 0.01, against +3.50% for an even split of F's own SVD (LoftQ's).

Damping: the calibration inputs are a few thousand tokens (the trainer's 4,096 training tokens,
train/methods.py), so an unregularised H over-fits them. DEFAULT_DAMP times H's mean diagonal is
added. Final gap to 16-bit LoRA on the demo (seed 0), damping 0.3 / 1 / 3: +2.70% / +1.50% /
+2.71%. With 913 tokens of generic calibration text instead (the first version), damping 0.01 /
1 / 10 / 1000 gave +3.43% / +2.39% / +2.27% / +2.36%, and keeping the 20 worst projections in
16-bit on top of it (keep_16bit_dynamic: 20) +1.79%. At seed 1 (another held-out split) the zero
start ends +4.18% and this one +4.73% (damping 1) / +4.20% (3): no gain. The start is always
closer to the 16-bit model, but 40 steps leave as much noise in the final loss as the differences
above, which is why `lora_init` stays `zero` by default.

The inputs X come from calibration text run through the model one decoder layer at a time: a
layer's statistics are taken on hidden states that already passed the compensated earlier layers
(as GPTQ does), and its adapters are set before its output is computed for the next layer.

The original W is read again from the model's checkpoint (`model.source`): a 4-bit load drops
each 16-bit weight once it is quantized. Tensors arrive in file order; the few that arrive
before their layer is reached are held until then.

An adapter made this way belongs to the 4-bit base it was computed on: applied to the 16-bit
base it would add E a second time. `lora/peft_format.py` records that base next to the adapter.

It sits in train/ because it reads the checkpoint again through the loaders, which sit above
`quant/` and `lora/`; `lora_init: quant_error` is a training setting.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from velotune.loaders import open_checkpoint
from velotune.loaders.build import split_fused
from velotune.lora.layers import LoraLinear
from velotune.models.calibration import layer_arguments, run_with_input_statistics
from velotune.quant.linear4bit import Linear4bit

DEFAULT_DAMP = 1.0   # times H's mean diagonal, added to H (module docstring)
A_ROW_NORM = (1 / 3) ** 0.5   # row norm of kaiming_uniform(a=sqrt(5)) A: entries U(+-1/sqrt(in))
EXACT_SVD_MAX_DIM = 1024   # exact triplets up to this min(out, in); randomized above (top_singular_triplets)
LOWRANK_OVERSAMPLE = 16
LOWRANK_ITERATIONS = 4


def low_rank_error_factors(error: torch.Tensor, hessian: torch.Tensor, rank: int,
                           damp: float = DEFAULT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(b [out, r'], a [r', in]) in float32 with b @ a the rank-r' matrix F minimising
    ||(error - F) L||_F, where hessian + damp * mean(diag) * I = L L^T; r' = min(rank, out, in).
    Input channels that never fire (zero diagonal) get a unit diagonal, so H stays positive definite."""
    if error.dim() != 2 or hessian.shape != (error.shape[1], error.shape[1]):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} does not fit an error of shape "
                         f"{tuple(error.shape)} (expected [in, in])")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return factors_under(error, damped_cholesky(hessian, damp, error.device), rank)


def damped_cholesky(hessian: torch.Tensor, damp: float, device: torch.device) -> torch.Tensor:
    """L (float64, on `device`) with hessian + damp * mean(diag) * I = L L^T, a zero diagonal
    entry (a channel that never fires) first set to 1. Projections reading one input (q/k/v,
    gate/up) share H, so `compensate_quantization_error` factors each H once."""
    h = hessian.to(device=device, dtype=torch.float64).clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return torch.linalg.cholesky(h)


def factors_under(error: torch.Tensor, chol: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`low_rank_error_factors` given the damped Cholesky factor L of H (`damped_cholesky`)."""
    weighted = error.double() @ chol
    r = min(rank, *weighted.shape)
    u, s, vh = top_singular_triplets(weighted, r)
    root = s.sqrt()
    b = u * root
    # a = sqrt(S) V^T L^{-1}: solve a L = sqrt(S) V^T, i.e. L^T a^T = (sqrt(S) V^T)^T.
    a = torch.linalg.solve_triangular(chol.T, (root[:, None] * vh).T, upper=True).T
    return b.float(), a.float()


def top_singular_triplets(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u [m, r], s [r], vh [r, n]): the r largest singular triplets of `matrix` (float64).

    Why not torch.linalg.svd: it computes every triplet, 58 s for a 2048 x 8192 matrix on two CPU
    cores, and an 8B model has 96 projections of 4096 x 14336; only r are needed.
    - min(m, n) up to EXACT_SVD_MAX_DIM: exact, from the eigenvectors of the small Gram matrix
      (M M^T or M^T M); in float64 the top triplets agree with a full SVD to 1e-13. On a CPU
      the demo model's 210 fits spend 5 s here in all, where a full SVD of one of its 576 x 1536
      matrices alone takes 0.57 s.
    - above: torch.svd_lowrank, a randomized range finder with four power iterations, 4.2 s for
      the matrix above with a rank-16 residual within 0.2% of the optimum on a noise-like
      spectrum, the hardest case for it (tests/quant/test_error_init.py checks 1%). Its random
      test matrix comes from a fixed seed in a forked RNG: the fit is reproducible and the
      training run's random stream is untouched."""
    m, n = matrix.shape
    if min(m, n) <= EXACT_SVD_MAX_DIM:
        wide = matrix if m <= n else matrix.T
        values, vectors = torch.linalg.eigh(wide @ wide.T)          # ascending
        left = vectors.flip(1)[:, :r]
        s = values.flip(0)[:r].clamp_min(0).sqrt()
        right = (left.T @ wide) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
        return (left, s, right) if m <= n else (right.T, s, left.T)
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=min(r + LOWRANK_OVERSAMPLE, m, n), niter=LOWRANK_ITERATIONS)
    return u[:, :r], s[:r], v[:, :r].T


def svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u [out, r], s [r], vh [r, in]) with b @ a = u diag(s) vh, from the factors (no [out, in] matrix)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, (qa @ vh.T).T


def set_adapter_to(layer: LoraLinear, b: torch.Tensor, a: torch.Tensor) -> None:
    """Make `layer`'s adapter equal b @ a (scale included), with A's rows orthonormal times
    A_ROW_NORM (module docstring). When b, a have a lower rank than the adapter, the other rows
    of A keep their default init (with B's columns zero), so that rank still trains. DoRA's
    magnitude is recomputed for the new weight."""
    u, s, vh = svd_of_product(b, a)
    a, b = A_ROW_NORM * vh, u * (s / (A_ROW_NORM * layer.scale))
    with torch.no_grad():
        layer.lora_B.weight.zero_()
        r = a.shape[0]
        layer.lora_A.weight[:r].copy_(a)
        layer.lora_B.weight[:, :r].copy_(b)
    if layer.lora_magnitude_vector is not None:
        layer.init_magnitude()


def compensate_layer(layer: LoraLinear, original: torch.Tensor, chol: torch.Tensor) -> None:
    """Set the adapter of `layer` (over a `Linear4bit`) to the best rank-r part of
    original - dequantized base under the input statistics whose damped Cholesky factor is `chol`
    (`damped_cholesky`; module docstring)."""
    base = layer.base_layer
    if not isinstance(base, Linear4bit):
        raise TypeError(f"quant_error initialisation needs a 4-bit base, got {type(base).__name__}")
    error = as_loaded(original, base) - base.dequantized_weight(torch.float32)
    b, a = factors_under(error, chol.to(error.device), layer.r)
    set_adapter_to(layer, b, a)


def as_loaded(original: torch.Tensor, base: Linear4bit) -> torch.Tensor:
    """`original` in float32 on `base`'s device, rounded to the load dtype first: the target is W
    as a 16-bit model of that dtype holds it, and what the 4-bit load quantized."""
    if tuple(original.shape) != (base.out_features, base.in_features):
        raise ValueError(f"original weight of shape {tuple(original.shape)} does not fit the 4-bit layer "
                         f"[{base.out_features}, {base.in_features}]")
    return original.to(device=base.packed.device, dtype=base.weight_dtype).float()


class OriginalWeights:
    """The 16-bit weights of named modules, read once more from the checkpoint `source` in file
    order; one asked for before it arrives is found by reading on, holding the wanted tensors
    passed on the way (only those) until they are asked for."""

    def __init__(self, source: str, wanted: set[str], model_config: Any) -> None:
        ckpt = open_checkpoint(source)
        if ckpt.prequantized:
            raise ValueError(f"{source}: a pre-quantized (*-bnb-4bit) checkpoint holds no 16-bit weights to "
                             "measure the 4-bit error against; lora_init quant_error needs a 16-bit checkpoint")
        self.source = source
        self.wanted = set(wanted)
        self.held: dict[str, torch.Tensor] = {}
        self.stream: Iterator[tuple[str, torch.Tensor]] = (
            (name, part) for raw, tensor in ckpt.tensors() for name, part in split_fused(raw, tensor, model_config))

    def take(self, module: str) -> torch.Tensor:
        key = module + ".weight"
        if key not in self.wanted:
            raise KeyError(f"{module!r} was not asked for")
        if key not in self.held:
            for name, tensor in self.stream:
                if name in self.wanted:
                    self.held[name] = tensor
                if name == key:
                    break
            else:
                raise ValueError(f"{self.source}: no tensor {key!r} in the checkpoint")
        self.wanted.discard(key)
        return self.held.pop(key)


def layer_by_layer(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                   visit: Callable[[int, dict[str, torch.Tensor]], None]) -> None:
    """Run calibration `ids` through the decoder layers one at a time; for layer i, call
    visit(i, {module path in the layer: H = X^T X of its input, float32}) before computing the
    layer's output for the next one, so what `visit` changes is seen downstream."""
    args = layer_arguments(model, ids, positions)
    hidden = args[0][0]
    for i, layer in enumerate(model.model.layers):
        _, hessians = run_with_input_statistics(layer, hidden, args[i],
                                                lambda _name, m: isinstance(m, LoraLinear), torch.float32)
        visit(i, hessians)
        with torch.no_grad():
            hidden = layer(hidden, *args[i][1:])


def compensate_quantization_error(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                                  damp: float = DEFAULT_DAMP) -> list[str]:
    """Initialise every LoRA adapter over a 4-bit base in `model`'s decoder layers (after
    `apply_lora`) so that base + adapter approximates the original weight on the calibration
    inputs `ids` [B, T] (`positions` restart per packed document). Returns the layers set."""
    source = getattr(model, "source", None)
    if source is None:
        raise ValueError("the model's checkpoint (model.source, set by load_model) is needed to read the "
                         "original weights from")
    targets = {name: m for name, m in model.named_modules() if name.startswith("model.layers.")
               and isinstance(m, LoraLinear) and isinstance(m.base_layer, Linear4bit)}
    if not targets:
        raise ValueError("no LoRA adapter sits on a 4-bit layer (method qlora with target_modules among "
                         "the quantized projections)")
    originals = OriginalWeights(source, {n + ".weight" for n in targets}, model.config)
    done: list[str] = []

    def visit(i: int, hessians: dict[str, torch.Tensor]) -> None:
        prefix = f"model.layers.{i}."
        chols: dict[int, torch.Tensor] = {}    # by id of the H object: q/k/v and gate/up share one
        for path, hessian in hessians.items():
            if prefix + path in targets:
                if id(hessian) not in chols:
                    chols[id(hessian)] = damped_cholesky(hessian, damp, hessian.device)
                compensate_layer(targets[prefix + path], originals.take(prefix + path), chols[id(hessian)])
                done.append(prefix + path)

    layer_by_layer(model, ids, positions, visit)
    missed = sorted(set(targets) - set(done))
    if missed:
        raise RuntimeError(f"calibration never reached adapted 4-bit layers {missed[:5]}")
    return done
