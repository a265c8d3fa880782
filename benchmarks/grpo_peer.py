"""One GRPO trial of bench_grpo_longest.py, in its own process (an out-of-memory error cannot poison
the next trial): one QLoRA GRPO step, a group of G completions of exactly N tokens after a prompt of
P tokens, with Unsloth + TRL (`--system unsloth`) or velotune's trainer (`--system velotune`).
Prints one line `GRPO {json}`: `outcome` ("ok", or the error that ended the step, out of memory
included), the step's seconds, peak allocated GiB, the completions' shortest length.

    python benchmarks/grpo_peer.py --system unsloth --model DIR --new 4096 [--group 8 --prompt 128 --micro-batch 1]
    python benchmarks/grpo_peer.py --system velotune --config Qwen3-8B --new 4096

- velotune: bench_grpo_memory.run, the trainer's GRPO step as `velotune train` runs it (random bf16
  weights built on the GPU from the named config or a config.json, NF4 projections, LoRA r16,
  gradient checkpointing on, checkpointed layer inputs offloaded to host memory, the config's EOS
  removed so every completion runs its full length; the prompt is P random ids).
- unsloth, its GRPO notebooks' set-up with `fast_inference=False` (vLLM is not on the device):
  `FastLanguageModel.from_pretrained(DIR, max_seq_length=P+N, load_in_4bit=True)`,
  `get_peft_model(r=16, lora_alpha=16, the seven projections, use_gradient_checkpointing="unsloth")`,
  TRL's `GRPOTrainer` with `GRPOConfig(num_generations=G, max_completion_length=N, max_steps=1,
  optim="adamw_8bit", learning_rate=5e-6, weight_decay=0.01, temperature=1.0, beta=0.04 (velotune's
  default KL weight, so both make the same reference pass with the adapters off; TRL's default is 0),
  per_device_train_batch_size=M, gradient_accumulation_steps=G/M)`, so TRL samples the whole group
  at once (steps_per_generation = G/M) and updates M completions per micro-batch, as velotune's
  `--micro-batch`. The reward is the number of distinct completion ids, as velotune's.

Assumptions about Unsloth 2026.10.9, unsloth_zoo 2026.10.9 and TRL 1.15 (read from their wheels;
Unsloth imports only with a GPU, so this side has not run where it was written):
- the random-weight folder (common.write_folder, SmolLM2's tokenizer beside the weights) opens
  offline (HF_HUB_OFFLINE=1, run_peer's environment); ids past the tokenizer's 49,152 decode to
  nothing, which is harmless: the reward reads `completion_ids`, which TRL passes to reward functions.
- EOS is never sampled: `generation_kwargs={"suppress_tokens": [...]}` (merged by TRL into the
  GenerationConfig of its `transformers.generate` path) gives every id TRL treats as EOS (the
  tokenizer's EOS and pad, the model's generation_config EOS) probability zero, so all completions
  run to `max_completion_length`; TRL's own `completions/min_length` metric is checked against N
  (a shorter one fails the trial; its absence is noted in the result, not failed).
- Unsloth rewrites `per_device_train_batch_size` only when batch x accumulation is not a multiple of
  num_generations (unsloth/models/rl.py); M x G/M = G never triggers it.
- the prompt "hello hello ..." is P tokens with SmolLM2's tokenizer (checked, reported as prompt_tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

# Before torch touches CUDA, for both systems alike: growing segments, so long completions' tensors
# do not strand memory between blocks of other sizes.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRPO_BETA = 0.04   # velotune's default grpo_beta (TrainConfig); TRL 1.15's default is 0, no reference pass


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=("unsloth", "velotune"), required=True)
    p.add_argument("--model", type=Path, help="unsloth: the random-weight Hugging Face folder")
    p.add_argument("--config", default="Qwen3-8B", help="velotune: a bundled config name or a config.json path")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, required=True)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--generation-batch", type=int, default=0,
                   help="velotune: completions decoded at once (generation_batch_size; 0: the whole group)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: velotune only (the smoke test)")
    args = p.parse_args(argv)
    if args.group % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --group {args.group}")
    if args.system == "unsloth" and (args.model is None or args.device != "cuda" or args.generation_batch):
        p.error("--system unsloth needs --model DIR and a CUDA GPU, and decodes the whole group "
                "(TRL has no --generation-batch)")
    return args


def velotune_config(name: str) -> dict:
    from velotune.models.known_configs import known_config

    path = Path(name)
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    found = known_config(name)
    if found is None:
        raise SystemExit(f"--config {name!r}: neither a config.json nor a bundled config "
                         "(velotune/models/known_configs.py)")
    return dict(found[1]["config"])


def run_velotune(args: argparse.Namespace, result: dict) -> None:
    import velotune
    from bench_grpo_memory import run

    result["version"] = f"velotune {velotune.__version__}"
    with tempfile.TemporaryDirectory(prefix="grpo-longest-") as workdir:
        r = run(velotune_config(args.config), group=args.group, prompt=args.prompt, new=args.new,
                micro_batch=args.micro_batch, device=args.device, offload=args.device == "cuda", workdir=workdir,
                generation_batch=args.generation_batch)
    gen, upd = r["generation"], r["update"]
    peak = None if gen.peak_allocated_gib is None else max(gen.peak_allocated_gib, upd.peak_allocated_gib)
    # run() raises unless every completion had exactly --new tokens
    result.update(outcome="ok", seconds=gen.seconds + upd.seconds, generation_s=gen.seconds, peak_gib=peak,
                  min_length=args.new, prompt_tokens=args.prompt, loss=r["loss"])


def distinct_ids(prompts: list, completions: list, completion_ids: list[list[int]], **_: object) -> list[float]:
    return [float(len(set(ids))) for ids in completion_ids]


def suppressed_ids(tokenizer, model) -> list[int]:
    """Every id TRL treats as the end of a completion: the tokenizer's EOS and pad, the model's EOS."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for eos in (model.generation_config.eos_token_id, model.config.eos_token_id):
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def run_unsloth(args: argparse.Namespace, result: dict) -> None:
    import unsloth  # before transformers and TRL, as it requires
    from unsloth import FastLanguageModel

    import torch
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    result["version"] = f"Unsloth {unsloth.__version__} (TRL {trl.__version__})"
    model, tokenizer = FastLanguageModel.from_pretrained(str(args.model), max_seq_length=args.prompt + args.new,
                                                         load_in_4bit=True, fast_inference=False)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    prompt = " ".join(["hello"] * args.prompt)
    result["prompt_tokens"] = len(tokenizer(prompt)["input_ids"])
    with tempfile.TemporaryDirectory(prefix="grpo-longest-unsloth-") as out:
        config = GRPOConfig(output_dir=out, learning_rate=5e-6, weight_decay=0.01, lr_scheduler_type="linear",
                            optim="adamw_8bit", logging_steps=1, per_device_train_batch_size=args.micro_batch,
                            gradient_accumulation_steps=args.group // args.micro_batch,
                            num_generations=args.group, max_completion_length=args.new, max_steps=1,
                            temperature=1.0, beta=GRPO_BETA, save_strategy="no", report_to="none", seed=0,
                            generation_kwargs={"suppress_tokens": suppressed_ids(tokenizer, model)})
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[distinct_ids], args=config,
                              train_dataset=Dataset.from_list([{"prompt": prompt}] * args.group))
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    logged = [h for h in trainer.state.log_history if "completions/min_length" in h]
    shortest = logged[-1]["completions/min_length"] if logged else None
    result.update(seconds=seconds, peak_gib=torch.cuda.max_memory_allocated() / 2**30, min_length=shortest,
                  outcome="ok" if shortest in (None, args.new) else f"completions shorter than {args.new}: {shortest}")
    if shortest is None:
        result["note"] = "lengths unchecked: TRL logged no completions/min_length"



def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result: dict = {"system": args.system, "new": args.new}
    try:
        (run_unsloth if args.system == "unsloth" else run_velotune)(args, result)
    except Exception as exc:  # noqa: BLE001  (reported, not raised: the parent records the trial)
        import torch

        from velotune.models.offload import OffloadError

        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in first.lower():
            result["outcome"] = f"GPU OOM ({first})"
        elif isinstance(exc, OffloadError):
            result["outcome"] = f"host memory OOM ({first})"
        else:
            result["outcome"] = f"{type(exc).__name__}: {first}"
    print("GRPO " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
