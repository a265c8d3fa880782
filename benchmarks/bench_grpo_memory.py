"""GRPO memory and time: one QLoRA GRPO step on the Llama-3.1-8B architecture, through the trainer.

The model is built with random bf16 weights directly on the GPU (no float32 copy), its seven
projections quantized to NF4 (`velotune.quant.quantize_linears`), LoRA r16 on them. One prompt of
P random tokens; one optimizer step of `velotune.train.Trainer` with method grpo, exactly what
`velotune train` runs: the GRPO objective samples a group of G completions of exactly N tokens with
the generation engine (the config's EOS is removed and the tokenizer has no stop tokens, so every
completion runs its full length), scores them, and the trainer accumulates over micro-batches of
M completions (reference and policy log-probabilities chunked over the vocabulary, backward) and
steps AdamW, with the trainer's memory settings: gradient checkpointing on, checkpointed layer
inputs offloaded to host memory (`--no-offload` keeps them on the GPU), the frozen input
embeddings in host memory where `offload_embeddings: auto` puts them (untied models on a GPU).

Two phases are measured inside that one step. The objective scores completions after sampling
them and before the update, so the reward function doubles as the boundary marker: when it is
called the peak memory and elapsed time are generation's; it then resets the peak counters, and
what is measured after the step returns is the update's. The reward itself is trivial (the number
of distinct tokens), enough to give the group non-zero advantages. Appends a row to RESULTS.md.

    python benchmarks/bench_grpo_memory.py --model Llama-3.1-8B --group 8 --prompt 128 --new 512
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch

from common import append_row, machine, require_cuda, today

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUDGET_GIB = 24.0


class RandomPromptTokenizer:
    """What the GRPO objective needs from a tokenizer, for a model without one: the chat template
    returns a fixed prompt of random ids, decoding writes ids as numbers, and there are no stop
    tokens."""

    stop_token_ids: list[int] = []
    pad_token_id = 0

    def __init__(self, prompt_ids: list[int]) -> None:
        self.prompt_ids = prompt_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return list(self.prompt_ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


@dataclass
class Phase:
    seconds: float
    peak_allocated_gib: float | None  # None off CUDA
    peak_reserved_gib: float | None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def phase_since(start: float, device: torch.device) -> Phase:
    sync(device)
    seconds = time.perf_counter() - start
    if device.type != "cuda":
        return Phase(seconds, None, None)
    return Phase(seconds, torch.cuda.max_memory_allocated(device) / 2**30,
                 torch.cuda.max_memory_reserved(device) / 2**30)


class GenerationBoundary:
    """The reward function: number of distinct tokens per completion; records the generation
    phase when called and resets the peak counters for the update."""

    __name__ = "distinct_tokens"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()
        self.generation: Phase | None = None
        self.update_start = 0.0

    def __call__(self, prompts: list[str], completions: list[str], **_: object) -> list[float]:
        self.generation = phase_since(self.start, self.device)
        reset_peaks(self.device)
        self.update_start = time.perf_counter()
        return distinct_tokens(prompts, completions)


def distinct_tokens(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    return [float(len(set(c.split()))) for c in completions]


def build(cfg: dict, device: torch.device, dtype: torch.dtype):
    """Random weights made in `dtype` on `device`, NF4 projections, float32 LoRA r16 adapters."""
    from velotune.lora import LoraConfig, apply_lora
    from velotune.models.config import ModelConfig
    from velotune.models.transformer import Transformer
    from velotune.quant import quantize_linears

    config = ModelConfig.from_hf_config(cfg, "bench")
    config.eos_token_id = None  # no stop token: every completion runs its full length
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no float32 copy of 8B weights
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    quantized = quantize_linears(model, TARGETS)
    if len(quantized) != 7 * config.num_hidden_layers:
        raise RuntimeError(f"expected {7 * config.num_hidden_layers} NF4 projections, quantized {len(quantized)}")
    apply_lora(model, LoraConfig(r=16, alpha=16, dropout=0.0, target_modules=TARGETS), dtype=torch.float32)
    return model


def run(cfg: dict, *, group: int, prompt: int, new: int, micro_batch: int, device: str = "cuda",
        dtype: torch.dtype = torch.bfloat16, offload: bool = True, workdir: str | None = None,
        generation_batch: int = 0) -> dict:
    """Build the model, make one GRPO step through the trainer, return both phases and what the
    step produced."""
    from velotune.lora import lora_parameters
    from velotune.rl.grpo import GRPOObjective, PromptExample
    from velotune.train import TrainConfig, Trainer

    if group % micro_batch:
        raise SystemExit(f"--micro-batch {micro_batch} must divide --group {group}")
    dev = torch.device(device)
    model = build(cfg, dev, dtype)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the build's bf16 projections are gone: measure from here
    params = lora_parameters(model)
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(1, cfg["vocab_size"], (prompt,), generator=g).tolist()
    config = TrainConfig(method="grpo", output_dir=workdir or tempfile.mkdtemp(prefix="bench-grpo-"),
                         device=dev.type, max_steps=1, micro_batch_size=micro_batch,
                         gradient_accumulation_steps=group // micro_batch, num_generations=group,
                         max_completion_length=new, max_seq_length=prompt + new, learning_rate=1e-4,
                         rewards=["bench_grpo_memory:distinct_tokens"], gradient_checkpointing=True,
                         offload_checkpoints=offload, report=False, lora_r=16, lora_alpha=16.0,
                         target_modules=TARGETS, generation_batch_size=generation_batch)
    boundary = GenerationBoundary(dev)
    objective = GRPOObjective(RandomPromptTokenizer(prompt_ids), [boundary], num_generations=group,
                              max_completion_length=new, temperature=1.0, beta=config.grpo_beta,
                              micro_batch_size=micro_batch, seed=0, generation_batch_size=generation_batch)
    trainer = Trainer(model, config, [PromptExample(prompt_ids, {"prompt": "random ids"}, 0)], objective=objective,
                      show_progress=False, device=dev)
    sync(dev)
    reset_peaks(dev)
    boundary.start = time.perf_counter()
    result = trainer.train()
    update = phase_since(boundary.update_start, dev)
    if trainer.metrics["completion_tokens"] != new:
        raise RuntimeError(f"completions should all have {new} tokens, got {trainer.metrics['completion_tokens']} "
                           "on average")
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    return dict(generation=boundary.generation, update=update, loss=result.losses[0],
                reward=trainer.metrics["reward"], adapters_changed=changed, adapters=len(params))


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def main() -> None:
    require_cuda()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=512, help="tokens per completion")
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward in the update")
    p.add_argument("--generation-batch", type=int, default=0,
                   help="completions decoded at once (generation_batch_size; 0: the whole group)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                   help="checkpointed layer inputs in host memory (default on)")
    args = p.parse_args()
    from velotune.models.known_configs import known_config

    found = known_config(args.model)
    if found is None:
        raise SystemExit(f"unknown model {args.model!r}; see velotune/models/known_configs.py")
    r = run(dict(found[1]["config"]), group=args.group, prompt=args.prompt, new=args.new,
            micro_batch=args.micro_batch, offload=args.offload, generation_batch=args.generation_batch)
    gen, upd = r["generation"], r["update"]
    peak = max(gen.peak_allocated_gib, upd.peak_allocated_gib)
    peak_reserved = max(gen.peak_reserved_gib, upd.peak_reserved_gib)
    config = (f"{args.model} QLoRA NF4 r16, Trainer (method grpo), ckpt on, offload {'on' if args.offload else 'off'}, "
              f"1 prompt of {args.prompt} tokens, {args.group} completions x {args.new} tokens, update micro-batch "
              f"{args.micro_batch}" + (f", decoded {args.generation_batch} at a time" if args.generation_batch else ""))
    cols = ["date", "machine", "config", "generation s", "generation peak alloc / reserved GiB", "update s",
            "update peak alloc / reserved GiB", "step peak alloc / reserved GiB", f"within {BUDGET_GIB:.0f} GiB"]
    row = [today(), machine(), config, f"{gen.seconds:.1f}",
           f"{gib(gen.peak_allocated_gib)} / {gib(gen.peak_reserved_gib)}", f"{upd.seconds:.1f}",
           f"{gib(upd.peak_allocated_gib)} / {gib(upd.peak_reserved_gib)}", f"{peak:.1f} / {peak_reserved:.1f}",
           str(peak_reserved <= BUDGET_GIB)]
    append_row("GRPO memory (QLoRA)", cols, row)
    print(" | ".join(row[2:]), flush=True)
    print(f"loss {r['loss']:.4f}, mean reward {r['reward']:.2f}, adapters changed {r['adapters_changed']}/{r['adapters']}")


if __name__ == "__main__":
    main()
