"""KL divergence of GGUF quant mixes to the f16 model's next-token distribution, all run by
llama.cpp itself (llama-cpp-python): velotune's dynamic mix against llama.cpp's own Q4_K_M
quantization of the same f16 file (`llama_model_quantize`), with file sizes.

    python benchmarks/bench_dynamic_gguf.py            # SmolLM2-135M-Instruct on the CPU
    python benchmarks/bench_dynamic_gguf.py --model PATH

Files: the f16 GGUF velotune writes; llama.cpp's Q4_K_M of that file (no importance matrix, as
`llama-quantize` runs by default); velotune's calibrated q4_k_m and its dynamic mix, both
calibrated on the train split of the bundled chatterbot dialogues. Text: the held-out split of
those dialogues and generic prose (the docstrings of Python standard-library modules), never
calibrated on. KL(f16 || quantized) is averaged over every predicted token. Rows go to RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_w4a16 import chat_rows, generic_rows
from common import append_row



def log_probs(llama_cpp, path: Path, rows: list[list[int]], n_ctx: int) -> list[np.ndarray]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, verbose=False, logits_all=True)
    out = []
    for row in rows:
        llm.reset()
        llm.eval(row)
        scores = np.asarray(llm.scores[:len(row)], dtype=np.float64)
        scores -= scores.max(axis=1, keepdims=True)
        out.append(scores - np.log(np.exp(scores).sum(axis=1, keepdims=True)))
    return out


def mean_kl(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    total = sum(float((np.exp(p) * (p - q)).sum()) for p, q in zip(reference, other))
    return total / sum(len(p) for p in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--length", type=int, default=256, help="tokens per generic-text row")
    parser.add_argument("--chat-rows", type=int, default=60, help="held-out dialogue rows evaluated")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import llama_cpp

    import velotune
    from velotune.export import export
    from velotune.train.export_calibration import rows_calibration

    model, tokenizer = velotune.load_model(args.model, dtype=torch.float32, device="cpu")
    model.eval()
    train, held_out = chat_rows(tokenizer)
    texts = {"held-out chat rows": held_out[:args.chat_rows], "generic text": generic_rows(tokenizer, args.length)}
    calibration = rows_calibration(train)
    n_ctx = max(len(r) for rows in texts.values() for r in rows) + 8
    name = args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = f"{platform.machine()} (CPU); llama-cpp-python {llama_cpp.__version__}; velotune {commit}"
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, Path] = {}
        seconds: dict[str, float] = {}
        files["f16"] = export(model, to="gguf", quant="f16", out=Path(tmp) / "f16.gguf", tokenizer=tokenizer)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = 2
        files["llama.cpp q4_k_m"] = Path(tmp) / "llamacpp-q4_k_m.gguf"
        started = time.perf_counter()
        if llama_cpp.llama_model_quantize(str(files["f16"]).encode(), str(files["llama.cpp q4_k_m"]).encode(),
                                          params) != 0:
            raise SystemExit("llama_model_quantize failed")
        seconds["llama.cpp q4_k_m"] = time.perf_counter() - started
        for quant in ("q4_k_m", "dynamic"):
            started = time.perf_counter()
            files[f"velotune {quant}"] = export(model, to="gguf", quant=quant, out=Path(tmp) / f"{quant}.gguf",
                                                tokenizer=tokenizer, calibration=calibration)
            seconds[f"velotune {quant}"] = time.perf_counter() - started
        reference = {text: log_probs(llama_cpp, files["f16"], rows, n_ctx) for text, rows in texts.items()}
        rows = []
        for label, path in files.items():
            if label == "f16":
                continue
            for text, token_rows in texts.items():
                kl = mean_kl(reference[text], log_probs(llama_cpp, path, token_rows, n_ctx))
                size = path.stat().st_size
                print(f"{label:18s} {text:20s} KL {kl:.5f}  {size / 2**20:.2f} MiB")
                rows.append([str(datetime.date.today()), machine, name, label,
                             f"{text} ({sum(len(r) for r in token_rows)} tokens)", f"{kl:.5f}",
                             f"{size / 2**20:.2f}", f"{seconds[label]:.0f}"])
    print("\n".join(" | ".join(row) for row in rows))
    if not args.no_write:
        columns = ["date", "machine", "model", "file", "text", "KL(f16 \\|\\| q)", "MiB", "quantize s"]
        for row in rows:
            append_row("Dynamic GGUF mix vs llama.cpp's Q4_K_M, KL to f16 run by llama.cpp, "
                       "benchmarks/bench_dynamic_gguf.py", columns, row)


if __name__ == "__main__":
    main()
