"""Unsloth's long-context training step, for bench_long_context.py `--vs-unsloth`, in its own
process: one forward + backward + AdamW step at batch 1 on random tokens, as its long-context
recipe sets it up (`FastLanguageModel.from_pretrained(max_seq_length=seq, dtype=bf16,
load_in_4bit=True)`, `get_peft_model(r=16, alpha=16, dropout 0, the seven projections,
use_gradient_checkpointing="unsloth")`, which offloads its checkpointed layer inputs to host
memory). Prints one line `PEER {json}`: seconds for the step (synchronized), peak allocated GiB,
or the error that ended it (out of memory included).

    python benchmarks/long_context_peer.py --model DIR --seq 262144
"""
from __future__ import annotations

import argparse
import json
import time

from peer_report import failure

p = argparse.ArgumentParser()
p.add_argument("--model", required=True, help="a Hugging Face folder (random weights will do)")
p.add_argument("--seq", type=int, required=True)
args = p.parse_args()

import unsloth  # noqa: E402,F401  (before transformers, as it requires)
from unsloth import FastLanguageModel  # noqa: E402

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
result: dict = {"system": "unsloth", "seq": args.seq}
try:
    model, _ = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=0)
    model.train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(args.seq)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda", generator=g)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    result.update(seconds=time.perf_counter() - start, loss=float(loss.detach()),
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30, outcome="ok")
except Exception as exc:  # noqa: BLE001  (reported, not raised: the parent records the row)
    result.update(outcome=failure(exc))
print("PEER " + json.dumps(result), flush=True)
