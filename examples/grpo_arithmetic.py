"""GRPO on generated arithmetic word problems with SmolLM2-135M-Instruct (the default model).

Each step draws a few problems, samples a group of answers per problem, rewards an exact numeric
answer (1.0) and the requested "Answer: N" format (0.5), and updates a LoRA adapter, through
`velotune train`'s own function (method grpo): checkpoints, eval reward on held-out problems
before and after, report and adapter under OUTPUT_DIR like any other run. It prints the mean
reward of the first and the last steps.

    python examples/grpo_arithmetic.py --steps 60
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia"]
THINGS = ["apples", "books", "coins", "marbles", "stickers", "pens"]
ANSWER_LINE = re.compile(r"Answer:\s*-?\d+")


def problem(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if rng.random() < 0.5:
        text, answer = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    else:
        a, b = max(a, b), min(a, b)
        text, answer = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
    return {"prompt": f"{text} End your reply with 'Answer: <number>'.", "answer": answer}


def write_problems(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(problem(rng)) + "\n" for _ in range(count)))
    return path


def answer_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """0.5 for a reply that ends with the requested 'Answer: N' line."""
    return [0.5 if ANSWER_LINE.search(c) else 0.0 for c in completions]


REWARDS = ["velotune.rl.rewards:exact_numeric_answer", "grpo_arithmetic:answer_format"]


def config(output_dir: Path, steps: int, problems: Path, **values: Any):
    from velotune.train.config import TrainConfig

    settings = dict(dataset=str(problems), method="grpo", output_dir=str(output_dir), rewards=REWARDS,
                    max_steps=steps, micro_batch_size=8, num_generations=4, max_completion_length=32,
                    max_seq_length=160, temperature=0.7, learning_rate=1e-4, lr_scheduler="constant",
                    lora_r=16, lora_alpha=32, eval_split=0.1, seed=0)
    return TrainConfig(**{**settings, **values})


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))     # the rewards are named grpo_arithmetic:...
    from velotune.train.metrics import read_metrics
    from velotune.train.run import train_from_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--output-dir", default="runs/grpo-arithmetic")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = write_problems(out / "problems.jsonl", 400, args.seed)
    train_from_config(config(out, args.steps, problems, seed=args.seed))
    rewards = [r["reward"] for r in read_metrics(out) if "reward" in r]
    window = max(1, min(20, len(rewards) // 2))
    print(f"mean reward, first {window} steps: {sum(rewards[:window]) / window:.3f}; "
          f"last {window} steps: {sum(rewards[-window:]) / window:.3f}")


if __name__ == "__main__":
    main()
