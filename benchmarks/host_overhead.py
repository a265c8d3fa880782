"""Host time of one eager checkpointed LoRA training step, with each decoder layer checkpointed
as one autograd node (models/layer_checkpoint.py, the default) and with torch's non-reentrant
checkpoint, alternating in one process.

Why: the eager 8B step at micro-batch 1 waits on the host (profiled on an H100: 408.8 ms a step,
the GPU busy 146.7 ms), and what a change saves there shows on the CPU too when the model is so
small that the arithmetic costs nothing: what is left is Python, autograd and the dispatcher. The
CPU runs the PyTorch references where a GPU runs Triton kernels, so the figure is a proxy for the
share saved, not for the GPU's milliseconds (benchmarks/profile_step.py measures those).

The model: Llama-3.1-8B's 32 layers at toy widths (hidden 64, 4 query and 2 key/value heads,
intermediate 128), float32, LoRA r4 on the seven projections, every layer checkpointed, one row of
16 tokens; `--steps` timed steps of each after 5 warm-ups, one thread. Prints min and median and
appends a row to RESULTS.md ("Host overhead of an eager step (CPU proxy)").

    python benchmarks/host_overhead.py [--steps 40] [--layers 32]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def toy(layers: int):
    from velotune.lora import LoraConfig, apply_lora
    from velotune.models.config import ModelConfig
    from velotune.models.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Transformer(cfg)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS), dtype=torch.float32)
    model.gradient_checkpointing = True
    return model.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    from common import append_row, today
    from velotune.models import layer_checkpoint

    torch.set_num_threads(1)
    model = toy(args.layers)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    one_node = layer_checkpoint.applies
    variants = {"one autograd node per layer": one_node, "torch checkpoint (non-reentrant)": lambda layer, x: False}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.steps + 5):
        for name, applies in variants.items():
            layer_checkpoint.applies = applies
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            if i >= 5:
                times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    layer_checkpoint.applies = one_node
    (ours, mine), (theirs, base) = times.items()
    ratio = statistics.median(base) / statistics.median(mine)
    for name, xs in times.items():
        print(f"{name}: min {min(xs) * 1e3:.1f} ms, median {statistics.median(xs) * 1e3:.1f} ms")
    print(f"torch checkpoint / one node (medians): {ratio:.2f}x")
    append_row("Host overhead of an eager step (CPU proxy)",
               ["date", "machine", "config", "one node per layer ms (min / median)",
                "torch checkpoint ms (min / median)", "speed-up (medians)"],
               [today(), f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, 1 thread), "
                         f"torch {torch.__version__}",
                f"{args.layers}-layer toy Llama (hidden 64), float32, LoRA r4 x 7, checkpointing on, 1 x 16 tokens, "
                f"{args.steps} steps each, alternating",
                f"{min(mine) * 1e3:.1f} / {statistics.median(mine) * 1e3:.1f}",
                f"{min(base) * 1e3:.1f} / {statistics.median(base) * 1e3:.1f}", f"{ratio:.2f}x"])


if __name__ == "__main__":
    main()
