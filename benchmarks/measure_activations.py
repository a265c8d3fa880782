"""The memory estimator's activation terms against one measured training step (Llama-3.2-1B).

For each row (method, checkpointing, batch, seq) a random-weight bf16 Llama-3.2-1B is built the
way bench_train.py builds velotune's side (LoRA/QLoRA: r=16 float32 adapters on the seven
projections, QLoRA loaded 4-bit from a saved random checkpoint; full: every weight trained), but
eager: no CUDA graphs, no offloaded checkpoints, embeddings on the GPU. Two warm-up steps
(forward, backward, fused AdamW step, zero_grad(set_to_none=True)), then one measured forward and
backward: the peak of `torch.cuda.max_memory_allocated` above what was allocated just before the
forward (weights and optimizer states), beside the estimator's max(activations, backward peak),
which predicts that quantity (`velotune.estimate`, module docstring).

Prints a markdown table, a Python list to paste as MEASURED_H100_GIB in tests/test_estimate.py,
and appends the rows to RESULTS.md, section "Estimator activation terms vs measured (Llama-3.2-1B)".

    python benchmarks/measure_activations.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
from pathlib import Path

import torch

from bench_train import hf_config, save_random_checkpoint, velotune_system
from common import append_row, machine, require_cuda, today

MODEL = "Llama-3.2-1B"
WARMUP = 2
# (method, checkpointing, batch, seq): the rows of MEASURED_H100_GIB, and QLoRA without checkpointing
ROWS = [("full", False, 4, 1024), ("full", True, 4, 1024), ("full", False, 8, 2048), ("full", True, 8, 2048),
        ("lora", False, 8, 2048), ("lora", True, 8, 2048), ("qlora", False, 8, 2048), ("qlora", True, 8, 2048)]
SECTION = f"Estimator activation terms vs measured ({MODEL})"
COLUMNS = ["date", "machine", "config", "measured GiB", "estimated GiB", "measured / estimated"]


def full_system(cfg: dict, checkpointing: bool):
    """A bf16 model with every weight trained, as bench_train.py builds the LoRA one before its adapters."""
    from velotune.models.config import ModelConfig
    from velotune.models.transformer import Transformer

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Transformer(ModelConfig.from_hf_config(cfg, MODEL))
    finally:
        torch.set_default_dtype(previous)
    model.gradient_checkpointing = checkpointing

    def step(ids):
        ids = ids.to("cuda", non_blocking=True)
        out = model(ids, labels=ids, return_logits=False)
        (out.loss_sum / out.num_targets).backward()

    return model, step


def system(cfg: dict, method: str, checkpointing: bool, folder: Path):
    """(model, step) for one row: eager, no offload, embeddings on the GPU."""
    if method == "full":
        return full_system(cfg, checkpointing)
    qlora = method == "qlora"     # the folder is QLoRA's; LoRA builds its bf16 model on the GPU
    model, step, _ = velotune_system(cfg, qlora, folder if qlora else None, "on" if checkpointing else "off",
                                     offload=False, graphs=False, host_embeddings=False)
    return model, step


def measured_gib(cfg: dict, method: str, checkpointing: bool, folder: Path, batch: int, seq: int) -> float:
    """Peak allocated during one forward + backward, above what was allocated before it, in GiB."""
    vocab = cfg["vocab_size"]
    model, step = system(cfg, method, checkpointing, folder)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    try:
        for _ in range(WARMUP):
            step(torch.randint(0, vocab, (batch, seq), generator=g))
            opt.step()
            opt.zero_grad(set_to_none=True)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(ids)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**30
    finally:
        del model, step, opt
        gc.collect()
        torch.cuda.empty_cache()


def estimated_gib(config, method: str, checkpointing: bool, batch: int, seq: int) -> float:
    from velotune.estimate import GIB, Setup, estimate

    est = estimate(config, Setup(method=method, batch=batch, seq=seq, optim="adamw", checkpointing=checkpointing,
                                 lora_r=16))
    return max(est.activations, est.backward_peak) / GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the random bf16 checkpoint for QLoRA is saved (default: a temporary folder, "
                        "removed after)")
    args = p.parse_args()
    require_cuda()
    from velotune.models.config import ModelConfig

    cfg = hf_config(MODEL)
    config = ModelConfig.from_hf_config(cfg, MODEL)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="velotune-activations-"))
    folder = save_random_checkpoint(cfg, workdir / MODEL)
    results = []
    try:
        print("| config | measured GiB | estimated GiB | measured / estimated |\n|---|---|---|---|")
        for method, ckpt, batch, seq in ROWS:
            measured = measured_gib(cfg, method, ckpt, folder, batch, seq)
            predicted = estimated_gib(config, method, ckpt, batch, seq)
            name = f"{MODEL} {method} batch {batch} seq {seq} ckpt {'on' if ckpt else 'off'}, eager, bf16"
            row = [name, f"{measured:.3f}", f"{predicted:.3f}", f"{measured / predicted:.3f}"]
            print("| " + " | ".join(row) + " |")
            append_row(SECTION, COLUMNS, [today(), machine(), *row])
            results.append((method, ckpt, batch, seq, round(measured, 3)))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nMEASURED_H100_GIB = [")
    for row in results:
        print(f"    {row!r},")
    print("]")


if __name__ == "__main__":
    main()
