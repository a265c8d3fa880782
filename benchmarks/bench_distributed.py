"""Multi-GPU evidence for DDP (LoRA) and FSDP2 (full fine-tuning), through velotune's own Trainer.

Run on one machine with 2 (or more) GPUs, by torchrun; every process keeps NVLink multicast off:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
      torchrun --standalone --nproc-per-node 2 benchmarks/bench_distributed.py --parts equal resume lora8b full8b

Parts (each appends rows to benchmarks/RESULTS.md from rank 0):
- equal: a small random Llama, 20 steps, 1 GPU x micro-batch 2b (rank 0 alone, the others wait)
  against N GPUs x micro-batch b, for LoRA (DDP) and full fine-tuning (FSDP2); per-step losses
  printed, the largest relative difference recorded (target: within 1%, bf16 autocast).
- resume: the full fine-tune's FSDP checkpoint of step 10 (written by N ranks) resumed on 1 GPU:
  its step-11 loss against the uninterrupted 1-GPU run's (target: within 1%).
- lora8b: Llama-3.1-8B architecture (random bf16 weights), LoRA r16, seq 2048, gradient
  checkpointing, micro-batch `--scaling-micro-batch` (4) per GPU: tokens/s on 1 GPU and on N GPUs
  (all ranks' tokens), and the ratio (target >= 1.9 x for 2 GPUs).
- full8b: full fine-tuning of the same architecture with FSDP2 across the N GPUs (float32 master
  weights built on the CPU and sharded onto the GPUs, bf16 mixed precision): tokens/s and the
  peak memory of every GPU.
The single-process helpers (`small_config`, `random_examples`, `train_losses`) run on the CPU too
(tests/distributed/test_bench_distributed.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_row, machine, today  # noqa: E402

from velotune import distributed  # noqa: E402
from velotune.data import IGNORE_INDEX, Example  # noqa: E402
from velotune.distributed import World  # noqa: E402
from velotune.train.config import TrainConfig  # noqa: E402
from velotune.train.trainer import Trainer  # noqa: E402

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")            # shared hosts: no NVLink multicast (docs/distributed.md)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

SMALL = dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
TOLERANCE = 0.01


def small_config():
    from velotune.models.config import ModelConfig

    return ModelConfig.from_hf_config(SMALL, "small-llama")


def random_examples(n: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> list[Example]:
    """Random token rows of varied lengths, the first quarter of each a prompt (not trained)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = length // 4
        rows.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], f"random {i}"))
    return rows


def build_model(model_config, method: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights from `seed` (the same on every rank): a bf16 base with float32 adapters for
    LoRA, float32 weights for a full fine-tune (on the CPU when FSDP will shard them)."""
    from velotune.lora import LoraConfig, apply_lora
    from velotune.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(model_config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    if method == "lora":
        torch.manual_seed(seed)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        apply_lora(model, LoraConfig(r=16, alpha=16, dropout=0.0, target_modules=targets), dtype=torch.float32)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    return model


def train_config(out: Path, method: str, micro_batch: int, steps: int, **extra) -> TrainConfig:
    return TrainConfig(method=method, output_dir=str(out), max_steps=steps, micro_batch_size=micro_batch,
                       learning_rate=1e-4 if method == "full" else 1e-3, lr_scheduler="constant",
                       max_grad_norm=1.0, seed=0, report=False, **extra)


def train_losses(model, config: TrainConfig, examples, world: World, device: torch.device,
                 resume: Path | None = None) -> tuple[list[float], Trainer]:
    trainer = Trainer(model, config, examples, show_progress=False, world=world, device=device)
    if resume is not None:
        trainer.resume_from(resume)
    return trainer.train().losses, trainer


def steady_tokens_per_s(out: Path, warmup: int = 2) -> float:
    """Median tokens/s of the logged steps after `warmup` (compilation, allocator growth)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > warmup]
    return statistics.median(rates)


def device_of(world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def max_relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def on_rank0_alone(world: World, run):
    """`run()` on rank 0 as a one-GPU job while the other ranks wait; its result on rank 0."""
    result = run() if world.is_main else None
    distributed.barrier(world)
    return result


def part_equal(world: World, work: Path, micro_batch: int, steps: int, resume_check: bool,
               methods: tuple[str, ...] = ("lora", "full")) -> None:
    device, cfg = device_of(world), small_config()
    examples = random_examples(steps * micro_batch * world.world_size, cfg.vocab_size, 128, 512)

    def report(method: str, dtype: torch.dtype, one: list[float], many: list[float], many_out: Path) -> None:
        """Rank 0's share: the per-step losses and the row; for the full fine-tune also the N-rank
        checkpoint of the middle step resumed on one GPU."""
        worst = max_relative(many, one)
        for i, (a, b) in enumerate(zip(one, many)):
            print(f"{method} step {i + 1}: 1 GPU {a:.5f}  {world.world_size} GPUs {b:.5f}")
        print(f"{method}: largest relative difference {worst:.2e} ({'ok' if worst <= TOLERANCE else 'OVER 1%'})")
        strategy = "DDP" if method == "lora" else "FSDP2"
        append_row("Distributed: N GPUs x micro-batch b vs 1 GPU x micro-batch N*b",
                   ["date", "machine", "method", "GPUs", "b", "steps", "max rel. loss diff", "within 1%"],
                   [today(), machine(), f"{method} ({strategy})", str(world.world_size), str(micro_batch),
                    str(steps), f"{worst:.2e}", "yes" if worst <= TOLERANCE else "no"])
        if method == "full" and resume_check:
            half = steps // 2
            resumed = train_losses(build_model(cfg, "full", device, dtype),
                                   train_config(work / "full-resumed-1gpu", "full", micro_batch * world.world_size,
                                                steps),
                                   examples, World(), device, resume=many_out / "checkpoints" / f"step-{half}")[0]
            diff = abs(resumed[0] - one[half]) / abs(one[half])
            # The run that wrote the checkpoint is the exact reference: the 1-GPU run differs from it
            # by bf16 rounding at every step before (up to the equality row's figure).
            same = abs(resumed[0] - many[half]) / abs(many[half])
            print(f"FSDP checkpoint of step {half} ({world.world_size} GPUs) resumed on 1 GPU: step {half + 1} "
                  f"loss {resumed[0]:.5f} vs uninterrupted {one[half]:.5f} on 1 GPU (rel. {diff:.2e}) and "
                  f"{many[half]:.5f} on {world.world_size} GPUs, the run that wrote it (rel. {same:.2e})")
            append_row("Distributed: FSDP checkpoint resumed on another number of GPUs",
                       ["date", "machine", "written on", "resumed on", "step", "resumed loss", "uninterrupted loss",
                        "rel. diff"],
                       [today(), machine(), f"{world.world_size} GPUs", "1 GPU", str(half + 1), f"{resumed[0]:.5f}",
                        f"{one[half]:.5f}", f"{diff:.2e}"])
            append_row("Distributed: FSDP checkpoint resumed on another number of GPUs, against the run that wrote it",
                       ["date", "machine", "written on", "resumed on", "step", "resumed loss", "writing run's loss",
                        "rel. diff"],
                       [today(), machine(), f"{world.world_size} GPUs", "1 GPU", str(half + 1), f"{resumed[0]:.5f}",
                        f"{many[half]:.5f}", f"{same:.2e}"])

    for method in methods:
        dtype = torch.bfloat16 if method == "lora" else torch.float32
        one_out, many_out = work / f"{method}-1gpu", work / f"{method}-{world.world_size}gpu"
        one = on_rank0_alone(world, lambda: train_losses(
            build_model(cfg, method, device, dtype),
            train_config(one_out, method, micro_batch * world.world_size, steps, save_steps=0),
            examples, World(), device)[0])
        load_device = torch.device("cpu") if method == "full" else device   # FSDP shards it onto the GPUs
        many, _ = train_losses(build_model(cfg, method, load_device, dtype),
                               train_config(many_out, method, micro_batch, steps, save_steps=steps // 2),
                               examples, world, device)
        if world.is_main:   # every rank then meets the barrier below: a rank that skipped it would pair the
            # next barrier or collective with the wrong one (the lora-then-full run hung that way on 2 GPUs)
            report(method, dtype, one, many, many_out)
        distributed.barrier(world)


def known(name: str):
    from velotune.models.config import ModelConfig
    from velotune.models.known_configs import known_config

    return ModelConfig.from_hf_config(dict(known_config(name)[1]["config"]), name)


def part_lora8b(world: World, work: Path, micro_batch: int, seq: int, steps: int) -> None:
    device, cfg = device_of(world), known("Llama-3.1-8B")
    examples = random_examples(steps * micro_batch * world.world_size, cfg.vocab_size, seq, seq)
    extra = dict(gradient_checkpointing=True, max_seq_length=seq)
    one_out, many_out = work / "lora8b-1gpu", work / f"lora8b-{world.world_size}gpu"

    def single() -> float:
        train_losses(build_model(cfg, "lora", device, torch.bfloat16),
                     train_config(one_out, "lora", micro_batch, steps, **extra), examples, World(), device)
        return steady_tokens_per_s(one_out)
    one = on_rank0_alone(world, single)
    torch.cuda.empty_cache()
    train_losses(build_model(cfg, "lora", device, torch.bfloat16),
                 train_config(many_out, "lora", micro_batch, steps, **extra), examples, world, device)
    if world.is_main:
        many = steady_tokens_per_s(many_out)
        print(f"Llama-3.1-8B LoRA r16 seq {seq}: 1 GPU {one:,.0f} tok/s, {world.world_size} GPUs {many:,.0f} tok/s "
              f"({many / one:.2f}x)")
        append_row("Distributed: LoRA scaling (DDP)",
                   ["date", "machine", "config", "1 GPU tokens/s", "N GPUs", "N GPUs tokens/s", "scaling"],
                   [today(), machine(), f"Llama-3.1-8B LoRA r16 mb{micro_batch} seq {seq}", f"{one:,.0f}",
                    str(world.world_size), f"{many:,.0f}", f"{many / one:.2f}x"])
    distributed.barrier(world)


def part_full8b(world: World, work: Path, micro_batch: int, seq: int, steps: int) -> None:
    device, cfg = device_of(world), known("Llama-3.1-8B")
    examples = random_examples(steps * micro_batch * world.world_size, cfg.vocab_size, seq, seq)
    out = work / f"full8b-{world.world_size}gpu"
    model = build_model(cfg, "full", torch.device("cpu"), torch.float32)
    torch.cuda.reset_peak_memory_stats(device)
    train_losses(model, train_config(out, "full", micro_batch, steps, gradient_checkpointing=True,
                                     max_seq_length=seq), examples, world, device)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    peaks = [torch.zeros_like(peak) for _ in range(world.world_size)]
    torch.distributed.all_gather(peaks, peak)
    if world.is_main:
        rate = steady_tokens_per_s(out)
        shown = ", ".join(f"{float(p):.1f}" for p in peaks)
        print(f"Llama-3.1-8B full FT FSDP2 on {world.world_size} GPUs: {rate:,.0f} tok/s, peak GiB per GPU: {shown}")
        append_row("Distributed: full fine-tuning with FSDP2",
                   ["date", "machine", "config", "GPUs", "tokens/s", "peak alloc GiB per GPU"],
                   [today(), machine(), f"Llama-3.1-8B full mb{micro_batch} seq {seq} bf16 mixed, checkpointing",
                    str(world.world_size), f"{rate:,.0f}", shown])
    distributed.barrier(world)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("equal", "resume", "lora8b", "full8b"),
                   default=["equal", "resume", "lora8b", "full8b"])
    p.add_argument("--micro-batch", type=int, default=2, help="b: per-GPU micro-batch of the equality runs")
    p.add_argument("--methods", nargs="+", choices=("lora", "full"), default=["lora", "full"],
                   help="methods of the equality runs (full also makes the checkpoint that `resume` reads)")
    p.add_argument("--scaling-micro-batch", type=int, default=4,
                   help="per-GPU micro-batch of the lora8b scaling runs (eager steps: at micro-batch 1 the host's "
                        "kernel launches, not the GPU, set the pace)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--workdir", type=Path, default=None, help="outputs (default: a temporary folder)")
    args = p.parse_args()
    world = distributed.setup()
    if not world.distributed or not torch.cuda.is_available():
        raise SystemExit("run under torchrun with 2 or more GPUs (see the docstring)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="velotune-dist-"))
    work = Path(distributed.broadcast_object(str(work), world))
    try:
        if "equal" in args.parts or "resume" in args.parts:
            part_equal(world, work, args.micro_batch, args.steps, resume_check="resume" in args.parts,
                       methods=tuple(args.methods))
        if "lora8b" in args.parts:
            part_lora8b(world, work, args.scaling_micro_batch, args.seq, 10)
        if "full8b" in args.parts:
            part_full8b(world, work, 1, args.seq, 6)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
