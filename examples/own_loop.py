"""Fine-tune in your own training loop: velotune's model where a transformers model would be.

`model(input_ids, labels=labels)` returns `.loss`, the mean over the target tokens (labels -100
are not trained), as a transformers causal LM does; the [tokens x vocab] logits are made only with
`return_logits=True`. On a GPU the loop below needs nothing more to run fast: a training forward
whose shape (rows padded to a few bucket widths) was seen before replays CUDA graphs by itself
(`model.cuda_graphs`, velotune/models/loop_graphs.py), and its `loss.backward()` fills the
adapters' `.grad` as usual; set `model.cuda_graphs = False` to run every step eagerly.

Here: SmolLM2-135M-Instruct (bundled), LoRA r16 on its projections, the chatterbot-corpus
dialogues with only the answers trained, one dialogue a step, AdamW. It prints the mean loss of
the first rows before and after training.

    python examples/own_loop.py [--steps 60] [--device cuda]
"""
from __future__ import annotations

import argparse

import torch

import velotune
from velotune.data.chatterbot import load_chatterbot
from velotune.lora import LoraConfig, apply_lora, lora_parameters

IGNORE_INDEX = -100


def dialogue_rows(tokenizer, count: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of the first `count` dialogues: the whole conversation as the model's chat
    template writes it, labels only on the last answer (the prompt before it is -100)."""
    rows = []
    for sample in load_chatterbot()[:count]:
        ids = tokenizer.apply_chat_template(sample.messages)
        prompt = tokenizer.apply_chat_template(sample.messages[:-1], add_generation_prompt=True)
        rows.append((ids, [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]))
    return rows


def mean_loss(model, rows, device) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device)).loss
                  for ids, labels in rows]
    model.train()
    return float(torch.stack(losses).mean())


def main(argv: list[str] | None = None) -> tuple[float, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--probe", type=int, default=8, help="dialogues whose loss is printed before and after")
    args = p.parse_args(argv)

    model, tokenizer = velotune.load_model(device=args.device)
    apply_lora(model, LoraConfig(r=16, alpha=16), dtype=torch.float32)
    model.gradient_checkpointing = True
    model.train()
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=args.lr)
    rows = dialogue_rows(tokenizer, args.steps)
    probe = rows[:args.probe]
    before = mean_loss(model, probe, args.device)
    for step, (ids, labels) in enumerate(rows, 1):
        out = model(torch.tensor([ids], device=args.device), labels=torch.tensor([labels], device=args.device))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            print(f"step {step}: loss {out.loss.item():.3f}")
    after = mean_loss(model, probe, args.device)
    print(f"mean loss of the first {len(probe)} dialogues: {before:.3f} before, {after:.3f} after")
    print(model.loop_graphs.describe())
    return before, after


if __name__ == "__main__":
    main()
