"""Forward + backward time and peak memory of each velotune kernel against its PyTorch reference.

Sizes are Llama-3.1-8B's (hidden 4096, 32 query / 8 key-value heads of 128, MLP 14336, vocabulary
128256), bfloat16, with `--tokens` tokens in the batch. Both sides go through the public functions
of `velotune.kernels`; the reference side runs with the kernels disabled. Time is the median of
`triton.testing.do_bench`; memory is the peak allocated during one forward + backward above what
the inputs already hold. Each run appends its rows to the "Kernels" table of benchmarks/RESULTS.md
(through common.py) with the date and the machine (device, torch, triton, CUDA versions).

Needs a CUDA GPU: `python benchmarks/bench_kernels.py [--tokens 4096]`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from common import append_row, bf16_matmul_tflops, machine, require_cuda, today

from velotune import kernels

SECTION = "Kernels: Llama-3.1-8B sizes, bf16, forward + backward"
COLUMNS = ["date", "machine", "op", "shape", "implementation", "median ms", "peak MiB above inputs"]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 4096, 32, 8, 128, 14336, 128256
EPS = 1e-5

Step = Callable[[], None]


def _leaf(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_()


def _cases(tokens: int, dtype: torch.dtype) -> list[tuple[str, str, Step, list[torch.Tensor]]]:
    """(op, shape, one forward + backward, tensors whose .grad is reset between runs)."""
    x, w = _leaf(tokens, HIDDEN, dtype=dtype), _leaf(HIDDEN, dtype=dtype)
    res = _leaf(tokens, HIDDEN, dtype=dtype)
    dy = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype)

    def rms_norm() -> None:
        kernels.rms_norm(x, w, EPS).backward(dy)

    def add_rms_norm() -> None:
        torch.autograd.backward(list(kernels.add_rms_norm(x, res, w, EPS)), [dy, dy])

    # q and k as the model makes them: [B, T, H, D] projections viewed as [B, H, T, D].
    q = _leaf(1, tokens, HEADS, HEAD_DIM, dtype=dtype)
    k = _leaf(1, tokens, KV_HEADS, HEAD_DIM, dtype=dtype)
    freqs = torch.arange(tokens, device="cuda")[:, None].float() * torch.rand(HEAD_DIM // 2, device="cuda")
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    dq, dk = torch.randn_like(q).transpose(1, 2), torch.randn_like(k).transpose(1, 2)

    def rope() -> None:
        torch.autograd.backward(list(kernels.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)), [dq, dk])

    gate, up = _leaf(tokens, INTERMEDIATE, dtype=dtype), _leaf(tokens, INTERMEDIATE, dtype=dtype)
    dout = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=dtype)

    def glu() -> None:
        kernels.glu(gate, up, "silu").backward(dout)

    hidden, head = _leaf(tokens, HIDDEN, dtype=dtype), _leaf(VOCAB, HIDDEN, dtype=dtype, scale=0.02)
    labels = torch.randint(0, VOCAB, (tokens,), device="cuda")

    def cross_entropy() -> None:
        kernels.linear_cross_entropy(hidden, head, labels)[0].backward()

    frozen_head = head.detach()

    def cross_entropy_frozen() -> None:
        kernels.linear_cross_entropy(hidden, frozen_head, labels)[0].backward()

    return [
        ("rms_norm", f"[{tokens}, {HIDDEN}]", rms_norm, [x, w]),
        ("add_rms_norm", f"[{tokens}, {HIDDEN}]", add_rms_norm, [x, res, w]),
        ("apply_rope", f"q [1, {HEADS}, {tokens}, {HEAD_DIM}], k [1, {KV_HEADS}, ...]", rope, [q, k]),
        ("glu silu", f"[{tokens}, {INTERMEDIATE}]", glu, [gate, up]),
        ("linear_cross_entropy", f"[{tokens}, {HIDDEN}] x [{VOCAB}, {HIDDEN}]", cross_entropy, [hidden, head]),
        ("linear_cross_entropy, frozen head", f"[{tokens}, {HIDDEN}] x [{VOCAB}, {HIDDEN}]",
         cross_entropy_frozen, [hidden]),
    ]


def _peak_mib(step: Step, grads: list[torch.Tensor]) -> float:
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the batch (default 4096)")
    args = parser.parse_args(argv)
    require_cuda()
    from triton.testing import do_bench

    torch.manual_seed(0)
    where = machine()
    bf16_matmul_tflops()  # brings the GPU to its working clocks before the first measurement
    for op, shape, step, grads in _cases(args.tokens, torch.bfloat16):
        for implementation, enabled in (("triton", True), ("reference", False)):
            kernels.set_kernels_enabled(enabled)
            peak = _peak_mib(step, grads)  # also compiles the kernels before they are timed
            ms = do_bench(step, warmup=100, grad_to_none=grads, return_mode="median")
            values = [today(), where, op, shape, implementation, f"{ms:.3f}", f"{peak:.0f}"]
            print(" | ".join(values), flush=True)
            append_row(SECTION, COLUMNS, values)
    kernels.set_kernels_enabled(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
