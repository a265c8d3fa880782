"""How often a quantized GGUF export gives the unquantized model's greedy answer.

Exports RUN (default runs/demo, made by `make demo`) to GGUF at each quant type, reads every file
back with velotune's GGUF loader, and compares 16-token greedy answers to 10 fixed prompts with
the unquantized (float32, adapter active) model's; since 10 answers are a coarse count, it also
reports the mean KL divergence and top-1 agreement of next-token distributions along the
reference answers (teacher-forced). Appends a row per type and rounding to RESULTS.md. --rounding: "default" (the export's own choice: calibrated for 4-bit types),
"nearest" (calibrate=False) or "calibrated" (calibrate=True). The prompts are fixed and were never
chosen by result; the calibration text (velotune.export.calibration) is disjoint from them.

    python benchmarks/quantized_answers.py [--run runs/demo] [--quant q8_0 q4_k_m ...] [--rounding nearest calibrated]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import velotune
from common import append_row, today
from velotune.export import export
from velotune.export.gguf import check_calibrate

ROUNDING = {"default": None, "nearest": False, "calibrated": True}

PROMPTS = ["What is the capital of France?", "Name three primary colours.", "What is 7 times 8?",
           "Who wrote Romeo and Juliet?", "What do bees make?", "How many days are in a week?",
           "What is the opposite of hot?", "Tell me a fun fact about cats.",
           "What language is spoken in Brazil?", "What is water made of?"]


def answers(model, tokenizer) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        generated = model.generate(torch.tensor([ids]), max_new_tokens=16, stop_token_ids=tokenizer.stop_token_ids)
        out.append(generated[0, len(ids):].tolist())
    return out


def log_probs(model, tokenizer, reference: list[list[int]]) -> list[torch.Tensor]:
    """Next-token log-probabilities along each prompt + reference answer."""
    out = []
    with torch.no_grad():
        for prompt, answer in zip(PROMPTS, reference):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            out.append(torch.log_softmax(model(torch.tensor([ids + answer])).logits[0].float(), dim=-1))
    return out


def divergence(want: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """(mean KL(want || got) per position, share of positions with the same top token)."""
    kl = torch.cat([(w.exp() * (w - g)).sum(-1) for w, g in zip(want, got)])
    same = torch.cat([w.argmax(-1) == g.argmax(-1) for w, g in zip(want, got)])
    return float(kl.mean()), float(same.float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--quant", nargs="+", default=["q8_0", "q4_k_m", "q4_0"])
    p.add_argument("--rounding", nargs="+", choices=tuple(ROUNDING), default=["default"])
    args = p.parse_args()
    adapter = Path(args.run) / "adapter"
    model, tokenizer = velotune.load_model(adapter, dtype=torch.float32, device="cpu")
    model.eval()
    reference = answers(model, tokenizer)
    reference_log_probs = log_probs(model, tokenizer, reference)
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            for rounding in args.rounding:
                start = time.perf_counter()
                path = export(model, to="gguf", quant=quant, out=Path(tmp) / f"{quant}.gguf", tokenizer=tokenizer,
                              calibrate=ROUNDING[rounding])
                seconds = time.perf_counter() - start
                quantized, _ = velotune.load_model(path, dtype=torch.float32, device="cpu")
                quantized.eval()
                same = sum(a == b for a, b in zip(reference, answers(quantized, tokenizer)))
                kl, top1 = divergence(reference_log_probs, log_probs(quantized, tokenizer, reference))
                how = "calibrated" if check_calibrate(quant, ROUNDING[rounding]) else "nearest"
                row = [today(), f"CPU ({platform.machine()}); torch {torch.__version__}", f"{adapter} merged", quant,
                       how, f"{path.stat().st_size / 2**20:.1f}", f"{seconds:.0f}", f"{kl:.4f}", f"{top1:.3f}",
                       f"{same} of {len(PROMPTS)}"]
                append_row("GGUF export: greedy answers equal to the unquantized model's (rounding)",
                           ["date", "machine", "model", "GGUF type", "rounding", "file MiB", "export s",
                            "mean KL", "top-1 agree", "same greedy answer"], row)
                print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
