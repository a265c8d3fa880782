"""Perplexity of the AWQ and GPTQ W4A16 exports against the 16-bit merged model and plain
round-to-nearest (RTN) at the same group size, as transformers (the real client, with the
compressed-tensors package) computes it from the exported folder.

    python benchmarks/bench_w4a16.py                      # SmolLM2-135M-Instruct on the CPU
    python benchmarks/bench_w4a16.py --model PATH --device cuda --group-size 128

Text: held-out rows of the training data (the bundled chatterbot dialogues' eval split; the
export calibrates on the train split, as `velotune export RUN` does) and generic English prose
(the docstrings of a few Python standard-library modules: offline, fixed, never calibrated on).
The 16-bit row is velotune's merged model; each 4-bit folder is loaded by transformers with
`CompressedTensorsConfig(dequantize=True)` (its run-compressed path cannot load zero-point
checkpoints in transformers 5.25 / compressed-tensors 0.20.1). Rows go to RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import append_row

GENERIC_MODULES = ("textwrap", "argparse", "json", "collections", "functools", "itertools", "pathlib",
                   "logging", "unittest", "csv", "heapq", "bisect", "difflib", "shutil", "random", "statistics")


def generic_rows(tokenizer, length: int) -> list[list[int]]:
    import importlib

    text = "\n\n".join(importlib.import_module(m).__doc__ or "" for m in GENERIC_MODULES)
    ids = tokenizer.encode(text)
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]


def chat_rows(tokenizer):
    from velotune.train import methods
    from velotune.train.config import TrainConfig

    data = methods.load_data(TrainConfig(), tokenizer)
    return [e.input_ids for e in data.train], [e.input_ids for e in data.eval]


def perplexity(forward, rows: list[list[int]], device: str) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row], device=device)
            logits = forward(ids).float()
            total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += len(row) - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder / GGUF (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=["rtn", "awq", "gptq"])
    parser.add_argument("--schemes", nargs="+", default=["w4a16_asym", "w4a16"])
    parser.add_argument("--generic-length", type=int, default=256)
    parser.add_argument("--texts", nargs="+", choices=["chat", "generic"], default=["chat", "generic"],
                        help="which texts to measure (held-out chat rows, generic prose)")
    parser.add_argument("--no-write", action="store_true", help="print rows without appending them")
    args = parser.parse_args()

    import transformers
    from transformers import CompressedTensorsConfig

    import velotune
    from velotune.export.serving import check_model, save_w4a16
    from velotune.train.export_calibration import W4A16_TOKENS, rows_calibration

    model, tokenizer = velotune.load_model(args.model, dtype=torch.float32, device=args.device)
    model.eval()
    group = check_model(model, args.group_size)
    train, held_out = chat_rows(tokenizer)
    generic = generic_rows(tokenizer, args.generic_length)
    calibration = rows_calibration(train, W4A16_TOKENS)
    texts = {name: rows for key, name, rows in (("chat", "held-out chat rows", held_out),
                                                ("generic", "generic text", generic)) if key in args.texts}
    base = {name: perplexity(lambda ids: model(ids).logits, rows, args.device) for name, rows in texts.items()}
    print(f"16-bit: {base}")
    name = args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} (CPU)"
    rows = []
    for scheme in args.schemes:
        ppl: dict[str, dict[str, float]] = {}
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                folder = save_w4a16(model, tokenizer, Path(tmp) / method, method, scheme, group, calibration)
                seconds = time.perf_counter() - started
                ref = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
                ).to(args.device).eval()
                ppl[method] = {t: perplexity(lambda ids: ref(ids).logits, r, args.device) for t, r in texts.items()}
            print(f"{scheme} {method}: {ppl[method]} ({seconds:.0f} s)")
            for text in texts:
                rtn = ppl.get("rtn", {}).get(text)
                vs_rtn = "" if rtn is None or method == "rtn" else f"{100 * (ppl[method][text] / rtn - 1):+.2f}%"
                rows.append([str(datetime.date.today()),
                             f"{device}; torch {torch.__version__}; transformers {transformers.__version__}; "
                             f"velotune {commit}", name, f"{method} {scheme} g{group}",
                             f"{text} ({len(texts[text])} rows)", f"{base[text]:.3f}", f"{ppl[method][text]:.3f}",
                             f"{100 * (ppl[method][text] / base[text] - 1):+.2f}%", vs_rtn, f"{seconds:.0f}"])
    print("\n".join(" | ".join(row) for row in rows))
    if not args.no_write:
        columns = ["date", "machine", "model", "export", "text", "16-bit ppl", "4-bit ppl", "vs 16-bit", "vs RTN",
                   "export s"]
        for row in rows:
            append_row("W4A16 exports (AWQ / GPTQ vs 16-bit and round-to-nearest), benchmarks/bench_w4a16.py",
                       columns, row)


if __name__ == "__main__":
    main()
