"""GRPO on generated arithmetic word problems with SmolLM2-135M-Instruct (the default model).

Each step draws a few problems, samples a group of answers per problem, rewards an exact numeric
answer (1.0) and the requested "Answer: N" format (0.5), and updates a LoRA adapter. It prints the
mean reward per step and, at the end, the mean over the first and the last 20 steps.

    python examples/grpo_arithmetic.py --steps 60
"""
from __future__ import annotations

import argparse
import random
import time

import torch

import velotune
from velotune.lora import LoraConfig, apply_lora, lora_parameters
from velotune.rl.grpo import GRPOSettings, grpo_step
from velotune.rl.rewards import exact_numeric_answer, required_format

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia"]
THINGS = ["apples", "books", "coins", "marbles", "stickers", "pens"]


def problem(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if rng.random() < 0.5:
        text, answer = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    else:
        a, b = max(a, b), min(a, b)
        text, answer = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
    return {"prompt": f"{text} End your reply with 'Answer: <number>'.", "answer": answer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-completion", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer = velotune.load_model()
    apply_lora(model, LoraConfig(r=16, alpha=32))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=args.lr)
    settings = GRPOSettings(num_generations=args.generations, max_completion_length=args.max_completion,
                            temperature=args.temperature, beta=0.04, micro_batch_size=8,
                            seed=args.seed)
    rewards = [exact_numeric_answer, required_format(r"Answer:\s*-?\d+")]
    history = []
    start = time.time()
    for step in range(args.steps):
        rows = [problem(rng) for _ in range(args.prompts_per_step)]
        result = grpo_step(model, tokenizer, rows, rewards, optimizer, settings, step=step)
        history.append(result.mean_reward)
        print(f"step {step + 1:3d}  mean reward {result.mean_reward:.3f}  loss {result.loss:+.4f}  "
              f"{time.time() - start:6.0f}s  e.g. {result.completions[0].text[:60]!r}", flush=True)
    window = min(20, len(history) // 2)
    first, last = sum(history[:window]) / window, sum(history[-window:]) / window
    print(f"mean reward, first {window} steps: {first:.3f}; last {window} steps: {last:.3f}; "
          f"{time.time() - start:.0f}s in all")


if __name__ == "__main__":
    main()
