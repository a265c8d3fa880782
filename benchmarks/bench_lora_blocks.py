"""Forward + backward time and memory of the fused LoRA blocks against the unfused path.

One Llama-3.1-8B decoder layer's projection blocks (hidden 4096, 32 query / 8 key-value heads of
128, MLP 14336), bf16 base weights, float32 LoRA adapters r=16 on all seven projections, with
`--tokens` tokens. Two precisions: no autocast (as benchmarks/bench_train.py runs: the unfused
path computes the adapters in float32) and bf16 autocast (as the trainer runs). The unfused side is
the modules' own forwards (each LoraLinear separately; the Triton GLU on both sides). Time: median of `triton.testing.do_bench`; memory: bytes kept for
the backward after the forward, and the forward + backward peak above the inputs. Rows go to the
"LoRA blocks" table of benchmarks/RESULTS.md.

Needs a CUDA GPU: `python benchmarks/bench_lora_blocks.py [--tokens 2048 8192]`.
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
from common import append_row, machine, require_cuda, today

from velotune import kernels
from velotune.lora import LoraConfig, fused
from velotune.lora.layers import LoraLinear

SECTION = "LoRA blocks: Llama-3.1-8B layer sizes, bf16 base, float32 adapters r16, forward + backward"
COLUMNS = ["date", "machine", "block", "tokens", "precision", "path", "median ms", "kept for backward MiB",
           "peak MiB above inputs", "speed ratio"]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, RANK = 4096, 32, 8, 128, 14336, 16


def lora(n_in: int, n_out: int) -> LoraLinear:
    base = torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    return LoraLinear(base, LoraConfig(r=RANK, alpha=16, init=False), dtype=torch.float32)


def blocks() -> dict[str, tuple[int, Callable, Callable, list[LoraLinear]]]:
    """name -> (input width, the fused call, the unfused call, its LoRA layers)."""
    q, k, v = lora(HIDDEN, HEADS * HEAD_DIM), lora(HIDDEN, KV_HEADS * HEAD_DIM), lora(HIDDEN, KV_HEADS * HEAD_DIM)
    o = lora(HEADS * HEAD_DIM, HIDDEN)
    gate, up, down = lora(HIDDEN, INTERMEDIATE), lora(HIDDEN, INTERMEDIATE), lora(INTERMEDIATE, HIDDEN)
    return {
        "q/k/v": (HIDDEN, lambda x: fused.project(x, q, k, v), lambda x: (q(x), k(x), v(x)), [q, k, v]),
        "o": (HEADS * HEAD_DIM, lambda x: fused.project(x, o), lambda x: (o(x),), [o]),
        "mlp": (HIDDEN, lambda x: (fused.mlp(x, gate, up, down, "silu"),),
                lambda x: (down(kernels.glu(gate(x), up(x), "silu")),), [gate, up, down]),
    }


def measure(call, x: torch.Tensor, layers: list[LoraLinear], autocast: bool) -> tuple[float, float, float]:
    import triton.testing

    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    params = [p for m in layers for p in (m.lora_A.weight, m.lora_B.weight)]

    def step() -> None:
        with ctx:
            outs = call(x)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        x.grad = None
        for p in params:
            p.grad = None

    step()
    ms = triton.testing.do_bench(step, warmup=5, rep=50)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with ctx:
        outs = call(x)
    kept = torch.cuda.memory_allocated() - before - sum(o.numel() * o.element_size() for o in outs)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    peak = torch.cuda.max_memory_allocated() - before
    del outs
    step()
    return ms, kept / 2**20, peak / 2**20


def main() -> None:
    require_cuda()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    args = p.parse_args()
    torch.manual_seed(0)
    for name, (width, fused_call, plain_call, layers) in blocks().items():
        for tokens in args.tokens:
            x = torch.randn(1, tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for autocast in (False, True):
                precision = "bf16 autocast" if autocast else "no autocast"
                fast, plain = measure(fused_call, x, layers, autocast), measure(plain_call, x, layers, autocast)
                for path, (ms, kept, peak) in (("unfused", plain), ("fused", fast)):
                    ratio = f"{plain[0] / ms:.2f}x"
                    row = [today(), machine(), name, str(tokens), precision, path, f"{ms:.3f}", f"{kept:.0f}",
                           f"{peak:.0f}", ratio]
                    append_row(SECTION, COLUMNS, row)
                    print(" | ".join(row[2:]))


if __name__ == "__main__":
    main()
