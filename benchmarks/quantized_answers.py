"""How often a quantized GGUF export gives the unquantized model's greedy answer.

Exports RUN (default runs/demo, made by `make demo`) to GGUF at each quant type, reads every file
back with velotune's GGUF loader, and compares 16-token greedy answers to 10 fixed prompts with
the unquantized (float32, adapter active) model's. Appends a row per type to RESULTS.md.

    python benchmarks/quantized_answers.py [--run runs/demo] [--quant q8_0 q4_0 ...]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

import velotune
from common import append_row, today
from velotune.export import export

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--quant", nargs="+", default=["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
    args = p.parse_args()
    adapter = Path(args.run) / "adapter"
    model, tokenizer = velotune.load_model(adapter, dtype=torch.float32, device="cpu")
    reference = answers(model, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            path = export(model, to="gguf", quant=quant, out=Path(tmp) / f"{quant}.gguf", tokenizer=tokenizer)
            quantized, _ = velotune.load_model(path, dtype=torch.float32, device="cpu")
            same = sum(a == b for a, b in zip(reference, answers(quantized, tokenizer)))
            row = [today(), f"CPU ({platform.machine()}); torch {torch.__version__}", f"{adapter} merged", quant,
                   f"{same} of {len(PROMPTS)}"]
            append_row("GGUF export: greedy answers equal to the unquantized model's",
                       ["date", "machine", "model", "GGUF type", "same greedy answer"], row)
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
