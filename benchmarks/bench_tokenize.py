"""Tokenization and batching speed on the CPU: 100,000 chat rows (the chatterbot dialogues drawn
with replacement, as `messages` JSONL) read, rendered with SmolLM2's chat template, labelled,
length-grouped and collated into every padding-free micro-batch of an epoch, as `velotune train`
does before and during a run. The target (issue 18): under 60 s on the project's 2-core machine.
Appends a row to RESULTS.md; the load average is printed beside it, since this machine is shared.

    python benchmarks/bench_tokenize.py --rows 100000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import velotune
from velotune.data import load_samples, tokenize_samples
from velotune.data.chatterbot import load_chatterbot
from velotune.train.data import MicroBatches


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    args = p.parse_args()
    import common

    _, tokenizer = velotune.load_model()
    dialogues = [s.messages for s in load_chatterbot()]
    rng = random.Random(0)
    path = Path(tempfile.mkdtemp()) / "rows.jsonl"
    path.write_text("".join(json.dumps({"messages": dialogues[rng.randrange(len(dialogues))]}) + "\n"
                            for _ in range(args.rows)))
    load = os.getloadavg()[0]
    started = time.perf_counter()
    samples = load_samples(str(path), format="auto", seed=0)
    read = time.perf_counter()
    examples, _ = tokenize_samples(samples, tokenizer, max_seq_length=2048)
    tokenized = time.perf_counter()
    batches = MicroBatches(examples, 4, pad_id=0, seed=0, flat=True, bucketed=True, max_seq_length=2048)
    for rows in batches.order(0):
        batches.collate(rows)
    done = time.perf_counter()
    total = done - started
    print(f"{args.rows:,} rows: read {read - started:.1f} s, tokenize {tokenized - read:.1f} s, "
          f"order + collate {len(batches)} micro-batches {done - tokenized:.1f} s, total {total:.1f} s "
          f"(load average {load:.1f} at the start)")
    common.append_row("Tokenization and batching on the CPU", [
        "date", "machine", "rows", "read s", "tokenize s", "collate s", "total s", "load average"], [
        common.today(), f"{os.cpu_count()}-core CPU", f"{args.rows:,} chat rows", f"{read - started:.1f}",
        f"{tokenized - read:.1f}", f"{done - tokenized:.1f}", f"{total:.1f}", f"{load:.1f}"])


if __name__ == "__main__":
    main()
