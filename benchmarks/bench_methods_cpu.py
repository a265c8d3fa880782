"""DPO, ORPO, KTO, SimPO and GRPO on the CPU with SmolLM2-135M-Instruct (the default model): does
each method move, measurably, what it is meant to move? Each runs through `velotune train`'s own
function (LoRA r16, the one trainer loop) and the trainer's eval before and after training.

- Preference methods: pairs from the chatterbot-corpus dialogues (real text shipped in a package):
  the prompt is a conversation's first user line, `chosen` its own answer, `rejected` the answer of
  a conversation from another file (topic), so the pair has a right and a wrong reply. 20% of the
  pairs are held out. The measure is the margin on the held-out pairs: the mean per-token
  log-probability of the chosen replies minus that of the rejected ones (eval_chosen_logp -
  eval_rejected_logp), under the policy, which every one of these methods should widen (KTO
  reads each pair as one desirable and one undesirable completion).
- GRPO: the arithmetic word problems and rewards of examples/grpo_arithmetic.py (exact answer
  1.0, an "Answer: N" line 0.5); the measure is the trainer's `eval_reward` on 32 held-out
  problems: the mean reward of 4 completions per problem, sampled at the training temperature
  from the same seeds before and after training.

Appends one row per method to RESULTS.md (date, machine, versions, settings, before, after).

    python benchmarks/bench_methods_cpu.py                       # all five
    python benchmarks/bench_methods_cpu.py --methods dpo,grpo --steps 20
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import append_row, today

ROOT = Path(__file__).resolve().parents[1]
PREFERENCE = ("dpo", "orpo", "kto", "simpo")
# beta per method: DPO/KTO's usual 0.1; ORPO's odds-ratio weight 0.1; SimPO's paper range is 2 to 2.5
BETA = {"dpo": 0.1, "orpo": 0.1, "kto": 0.1, "simpo": 2.0}


def preference_pairs(path: Path, count: int, seed: int) -> Path:
    """Pairs from the chatterbot corpus: a user line, its answer, and an answer from another file."""
    from velotune.data import load_chatterbot

    rng = random.Random(seed)
    samples = [s for s in load_chatterbot() if len(s.messages) >= 2]
    rng.shuffle(samples)
    rows, seen = [], set()
    for sample in samples:
        prompt, answer = sample.messages[0]["content"], sample.messages[1]["content"]
        if prompt in seen:
            continue
        other = rng.choice([s for s in samples if s.metadata["file"] != sample.metadata["file"]])
        rows.append({"prompt": prompt, "chosen": answer, "rejected": other.messages[1]["content"]})
        seen.add(prompt)
        if len(rows) == count:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def versions() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return f"torch {torch.__version__}; velotune {rev.strip() or '?'}"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)"


def run(method: str, workdir: Path, steps: int, seed: int, grpo_lr: float = 5e-4) -> dict:
    from velotune.train.config import TrainConfig
    from velotune.train.metrics import read_metrics
    from velotune.train.run import train_from_config

    out = workdir / method
    if method == "grpo":
        sys.path.insert(0, str(ROOT / "examples"))
        import grpo_arithmetic

        problems = grpo_arithmetic.write_problems(workdir / "problems.jsonl", 160, seed)
        # 4 problems x 4 completions a step (two micro-batches of 8), a higher learning rate than the
        # example's 1e-4 so that a short CPU run moves the reward; 32 held-out problems
        config = grpo_arithmetic.config(out, steps, problems, eval_split=0.2, seed=seed, device="cpu", report=False,
                                        gradient_accumulation_steps=2, learning_rate=grpo_lr)
        measure = "eval_reward"
    else:
        data = workdir / "pairs.jsonl"
        if not data.exists():
            preference_pairs(data, 120, seed)
        config = TrainConfig(dataset=str(data), method=method, output_dir=str(out), max_steps=steps,
                             micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-4,
                             lr_scheduler="constant", warmup_steps=2, max_seq_length=128, lora_r=16, lora_alpha=32,
                             beta=BETA[method], eval_split=0.2, device="cpu", report=False, seed=seed)
        measure = "eval_chosen_logp"
    started = time.perf_counter()
    train_from_config(config, show_progress=False)
    seconds = time.perf_counter() - started
    evals = {r["step"]: r for r in read_metrics(out) if measure in r}
    before, after = evals[0], evals[max(evals)]
    if method == "grpo":
        return dict(config=config, before=before["eval_reward"], after=after["eval_reward"], seconds=seconds,
                    name=f"held-out reward ({config.num_generations} sampled completions per problem)")
    margin = [r["eval_chosen_logp"] - r["eval_rejected_logp"] for r in (before, after)]
    return dict(config=config, before=margin[0], after=margin[1], seconds=seconds,
                name="held-out margin (chosen - rejected logp/token)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join((*PREFERENCE, "grpo")))
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of the preference methods")
    p.add_argument("--grpo-steps", type=int, default=30)
    p.add_argument("--grpo-lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-methods-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cols = ["date", "machine", "versions", "method", "settings", "measure", "before", "after", "change",
            "train s"]
    for method in args.methods.split(","):
        r = run(method, workdir, args.grpo_steps if method == "grpo" else args.steps, args.seed, args.grpo_lr)
        c = r["config"]
        settings = (f"SmolLM2-135M-Instruct LoRA r{c.lora_r}, {c.max_steps} steps x {c.micro_batch_size} x "
                    f"{c.gradient_accumulation_steps}, lr {c.learning_rate:g}"
                    + (f", beta {c.beta:g}" if method != "grpo" else f", {c.num_generations} completions/prompt"))
        row = [today(), machine(), versions(), method, settings, r["name"], f"{r['before']:.4f}", f"{r['after']:.4f}",
               f"{r['after'] - r['before']:+.4f}", f"{r['seconds']:.0f}"]
        append_row("Preference and RL methods on the CPU (SmolLM2-135M-Instruct)", cols, row)
        print(" | ".join(row[3:]), flush=True)


if __name__ == "__main__":
    main()
