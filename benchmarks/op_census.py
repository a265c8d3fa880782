"""What one eager training step dispatches per decoder layer: the operations that launch a kernel
on a GPU (aten operations and Triton kernels), and apart from them the views and allocations that
launch none, in the forward, the checkpoint's recomputation and the backward.

Why: on an H100 (2026-12-07) velotune's eager Llama-3.1-8B LoRA step at micro-batch 1 x 2048 took
338 ms where its CUDA-graphed replay took ~180 ms with the GPU busy ~170 ms: the eager step waits
on the host, which queues ~5,600 kernels a step at ~60 us each (Python, autograd, the dispatcher).
Fewer operations per layer is the lever; this counts them, on the CPU, so a change can be judged
(and a test can pin the count, tests/models/test_op_census.py) without a GPU.

How:
- The model is Llama-3.1-8B's config at toy widths (hidden 256, 8 query and 2 key/value heads of
  32, intermediate 512, a 1,024-token vocabulary; Llama 3's rope scaling and untied head kept),
  bf16 weights with float32 LoRA r16 adapters on the seven projections and every layer
  checkpointed: bench_train.py's `velotune_system` in the plain loop that `--vs-unsloth` times (no
  autocast, as a user's own loop calls the model). `--autocast` runs it the trainer's way on a GPU
  instead (the same model under bf16 autocast, `Trainer.forward_sum`).
- The Triton path is forced (`kernels.force_triton` under `TRITON_INTERPRET=1`, as the kernel tests
  run it), so the kernels that run on a GPU run here; their values are not checked (bf16 `tl.dot`
  is not exact in the interpreter), only counted. A `TorchDispatchMode` counts each aten operation
  below autograd; each Triton launch counts once as `triton:<kernel>`, and what the interpreter
  itself dispatches while running a kernel is not counted.
- The per-layer count is the difference between the same step on a model of `layers + 1` and of
  `layers` decoder layers (everything but the layers, embedding, rotary tables, loss, is the same
  in both); the rest is the step's fixed part. A step of the real model is fixed + 32 x per-layer.
- Phases: forward (before `backward()`), recompute (`checkpointing.recomputing()`, which the
  checkpoint sets while it runs a layer again) and backward (the rest of `backward()`).
Differences from a GPU: SDPA and matmuls pick the CPU's kernels (one operation each here too);
counts do not depend on widths, except the fused MLP's row chunks (one at 8B micro-batch 1, four
at micro-batch 4; see `lora/fused.py:_row_chunks`), which this does not model. The optimizer step
(one fused AdamW call) is not counted.

    python benchmarks/op_census.py [--autocast] [--layers 2] [--seq 64] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

if not torch.cuda.is_available():   # before any kernel module is imported (Triton decides at decoration)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

PHASES = ("forward", "recompute", "backward")
KINDS = ("launches", "allocations", "views")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Llama-3.1-8B's head layout and proportions, shrunk (bench_train's TOY is smaller still)
TOY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
           vocab_size=1024)
# Operations that make a tensor without writing it: no kernel on a GPU, only the allocator.
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# Operations that return tensor metadata, or a tensor sharing storage without the schema saying so.
METADATA = {"_unsafe_view", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
            "_has_compatible_shallow_copy_type", "lift_fresh", "promote_types", "result_type"}


def kind_of(func: torch._ops.OpOverload) -> str:
    """"views" (no kernel: a view or metadata), "allocations" (no kernel: memory only) or "launches"."""
    name = func.overloadpacket.__name__
    if func.is_view or name in METADATA:
        return "views"
    if name in ALLOCATIONS:
        return "allocations"
    return "launches"


@dataclass
class Counts:
    """phase -> kind -> operation name -> calls."""

    table: dict[str, dict[str, Counter]] = field(
        default_factory=lambda: {p: {k: Counter() for k in KINDS} for p in PHASES})

    def total(self, phase: str, kind: str = "launches") -> int:
        return sum(self.table[phase][kind].values())

    def __sub__(self, other: Counts) -> Counts:
        out = Counts()
        for p in PHASES:
            for k in KINDS:
                diff = Counter(self.table[p][k])
                diff.subtract(other.table[p][k])
                out.table[p][k] = Counter({n: c for n, c in diff.items() if c})
        return out

    def as_dict(self) -> dict:
        return {p: {k: dict(sorted(c.items())) for k, c in kinds.items()} for p, kinds in self.table.items()}


class Census(TorchDispatchMode):
    """Counts every aten operation dispatched while active, by phase and kind; `triton_launches`
    adds the Triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()
        self.in_backward = False
        self.paused = 0

    def phase(self) -> str:
        from velotune.models.checkpointing import recomputing

        if recomputing():
            return "recompute"
        return "backward" if self.in_backward else "forward"

    def record(self, kind: str, name: str) -> None:
        if not self.paused:
            self.counts.table[self.phase()][kind][name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.record(kind_of(func), func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def triton_launches(self) -> Iterator[None]:
        """Each `kernel[grid](...)` counts once as a launch; nothing it dispatches (the
        interpreter's own copies) is counted."""
        from triton.runtime.jit import KernelInterface

        original = KernelInterface.__getitem__
        census = self

        def launch(kernel, grid):
            run = original(kernel, grid)
            name = "triton:" + getattr(kernel, "fn", kernel).__name__

            def counted(*args, **kwargs):
                census.record("launches", name)
                census.paused += 1
                try:
                    return run(*args, **kwargs)
                finally:
                    census.paused -= 1
            return counted

        KernelInterface.__getitem__ = launch
        try:
            yield
        finally:
            KernelInterface.__getitem__ = original


def build_model(layers: int, device: str = "cpu") -> torch.nn.Module:
    """The toy Llama-3.1-8B of the module docstring with `layers` decoder layers, LoRA applied,
    checkpointing on, in training mode."""
    from velotune.lora import LoraConfig, apply_lora
    from velotune.models.config import ModelConfig
    from velotune.models.known_configs import known_config
    from velotune.models.transformer import Transformer

    cfg = {**known_config("Llama-3.1-8B")[1]["config"], **TOY, "num_hidden_layers": layers}
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf_config(cfg, "<census>")).to(device=device, dtype=torch.bfloat16)
    model.gradient_checkpointing = True
    apply_lora(model, LoraConfig(r=16, alpha=16, dropout=0.0, target_modules=TARGETS), dtype=torch.float32)
    with torch.no_grad():   # B = 0 at init: make the adapters' terms real
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.train()


def step_counts(model: torch.nn.Module, ids: torch.Tensor, autocast: bool = False) -> Counts:
    """The counts of one training step (forward with the loss, backward) of `model` on `ids`,
    the Triton path forced where there is no GPU."""
    from velotune.kernels import force_triton

    device = ids.device.type
    forced = force_triton() if device == "cpu" else contextlib.nullcontext()
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)
    census = Census()
    with forced, census, census.triton_launches():
        with amp:
            out = model(ids, labels=ids, return_logits=False)
            loss = out.loss_sum / out.num_targets
        census.in_backward = True
        loss.backward()
    model.zero_grad(set_to_none=True)
    return census.counts


def layer_census(layers: int = 2, seq: int = 64, autocast: bool = False,
                 device: str = "cpu") -> tuple[Counts, Counts]:
    """(per decoder layer, fixed part) of one step's counts, from models of `layers` and
    `layers + 1` decoder layers (see the module docstring)."""
    ids = torch.randint(0, TOY["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    small = step_counts(build_model(layers, device), ids, autocast)
    large = step_counts(build_model(layers + 1, device), ids, autocast)
    per_layer = large - small
    fixed = Counts()
    for p in PHASES:
        for k in KINDS:
            fixed.table[p][k] = Counter({n: c - layers * per_layer.table[p][k][n]
                                         for n, c in small.table[p][k].items()})
    return per_layer, fixed


def launches_per_layer(per_layer: Counts) -> int:
    """Operations that launch a kernel in one decoder layer's forward, recomputation and backward."""
    return sum(per_layer.total(p) for p in PHASES)


def report(per_layer: Counts, fixed: Counts, layers_of_real_model: int = 32) -> str:
    """The per-layer table (operation -> count per phase, by kind) and the step totals."""
    lines = []
    for kind in KINDS:
        names = sorted({n for p in PHASES for n in per_layer.table[p][kind]},
                       key=lambda n: (-sum(per_layer.table[p][kind][n] for p in PHASES), n))
        lines.append(f"\n{kind} per decoder layer" + (" (no kernel)" if kind != "launches" else ""))
        lines.append(f"  {'operation':44s} {'forward':>8s} {'recompute':>10s} {'backward':>9s}")
        for n in names:
            row = [per_layer.table[p][kind][n] for p in PHASES]
            lines.append(f"  {n:44s} {row[0]:8d} {row[1]:10d} {row[2]:9d}")
        totals = [per_layer.total(p, kind) for p in PHASES]
        lines.append(f"  {'total':44s} {totals[0]:8d} {totals[1]:10d} {totals[2]:9d}   (all phases {sum(totals)})")
    lines.append("\nper step, extrapolated to a model of "
                 f"{layers_of_real_model} layers (fixed part + {layers_of_real_model} x per layer):")
    for kind in KINDS:
        parts = {p: fixed.total(p, kind) + layers_of_real_model * per_layer.total(p, kind) for p in PHASES}
        lines.append(f"  {kind:12s} " + ", ".join(f"{p} {n}" for p, n in parts.items())
                     + f"; total {sum(parts.values())} (fixed part {sum(fixed.total(p, kind) for p in PHASES)})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="the smaller of the two models (the other has one more)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--autocast", action="store_true", help="under bf16 autocast (the trainer's way on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu (Triton interpreted) or cuda (compiled kernels)")
    p.add_argument("--json", help="also write the counts to this file")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")   # the interpreter's bf16 overflows
    per_layer, fixed = layer_census(args.layers, args.seq, args.autocast, args.device)
    mode = "bf16 autocast" if args.autocast else "no autocast"
    print(f"op census: toy Llama-3.1-8B in bf16, float32 LoRA r16 adapters on {len(TARGETS)} projections, "
          f"checkpointing on, {mode}, "
          f"1 x {args.seq} tokens on {args.device}")
    print(report(per_layer, fixed))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_layer": per_layer.as_dict(), "fixed": fixed.as_dict()}, f, indent=1)


if __name__ == "__main__":
    main()
