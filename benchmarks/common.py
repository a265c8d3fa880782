"""Shared pieces of the GPU benchmarks: the machine line, the measured bf16 matmul rate, MFU,
timing, appending rows to benchmarks/RESULTS.md, the random-weight Hugging Face folders that
peer systems load, and running one peer system in its own process."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
# Peers run offline, without Unsloth's usage statistics (the device machine has no internet)
PEER_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (run it on the device machine)")


def machine() -> str:
    import triton
    import transformers

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return (f"{name}; torch {torch.__version__}; triton {triton.__version__}; "
            f"transformers {transformers.__version__}; CUDA {torch.version.cuda}")


def versions(*packages: str) -> str:
    """"name version" of each installed package (read from its metadata, so nothing is imported)."""
    found = []
    for name in packages:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def bf16_matmul_tflops(n: int = 8192, reps: int = 50) -> float:
    """The bf16 matmul rate of this GPU, measured now (MFU's denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def train_flops_per_token(config, seq_len: int) -> float:
    """6 x non-embedding parameters + the attention term (QK^T and PV, forward and backward:
    6 x 2 x layers x seq x heads x head_dim, halved for causal masking)."""
    attn = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6 * config.num_parameters(embeddings=False) + attn


def append_row(section: str, columns: list[str], values: list[str], results: Path | None = None) -> None:
    """Append one row to the table under `## section` in RESULTS.md (or `results`), creating it if needed."""
    path = results or RESULTS
    text = path.read_text() if path.exists() else "# Benchmark results\n\nEvery row names its date and machine.\n"
    heading = f"## {section}"
    row = "| " + " | ".join(values) + " |"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        text += row + "\n"
    else:
        head, _, tail = text.partition(heading)
        # the section's table ends at the first blank line after its header
        table_end = tail.find("\n\n", tail.find("|"))
        if table_end < 0:
            tail = tail.rstrip("\n") + "\n" + row + "\n"
        else:
            tail = tail[:table_end] + "\n" + row + tail[table_end:]
        text = head + heading + tail
    path.write_text(text)


def today() -> str:
    return datetime.date.today().isoformat()


# ------------------------------------------------------------------ random-weight folders for peers
def transformers_config(cfg: dict):
    """transformers' config object for an HF config dict (its `model_type` picks the class)."""
    import transformers

    rest = {k: v for k, v in cfg.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(cfg["model_type"], **rest)


def bf16_bytes(cfg: dict) -> int:
    from velotune.models.config import ModelConfig

    return 2 * ModelConfig.from_hf_config(cfg, "peer folder").num_parameters()


def folder_for(cfg: dict, workdir: str | Path) -> Path:
    return Path(workdir) / f"{cfg['model_type']}-{cfg['num_hidden_layers']}L-h{cfg['hidden_size']}"


def choose_workdir(workdir: str, need: int, name: str) -> Path:
    """"auto": /dev/shm/NAME when it holds `need` bytes with 8 GB to spare (host memory writes and
    reads back several GB/s, a disk about 0.27), else /tmp/NAME."""
    if workdir != "auto":
        return Path(workdir)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.1 * need + 8e9:
        return shm / name
    return Path("/tmp") / name


def write_folder(cfg: dict, folder: Path, tokenizer: Path | None, device: str) -> Path:
    """Random bf16 weights (transformers' own initialisation, seed 0, built on `device`) saved as a
    Hugging Face folder, with `tokenizer`'s files beside them. A complete folder of the same config
    is kept (a warm machine's second call); the weights go to `folder`.partial first, renamed when whole."""
    import transformers

    done = folder / "config.json"
    if done.exists() and all(json.loads(done.read_text()).get(k) == cfg[k]
                             for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")):
        return folder
    need = bf16_bytes(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if need * 1.05 > free:
        raise SystemExit(f"{folder}: the random bf16 folder needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB is free "
                         "(give a smaller model or another --workdir)")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(transformers_config(cfg), dtype=torch.bfloat16)
    model.save_pretrained(partial)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, partial / f.name)
    partial.rename(folder)
    return folder


# ------------------------------------------------------------------ one peer system in its own process
def run_peer(command: list[str], tag: str, system: str, timeout: float) -> dict:
    """Run one system's process (`command`, with PEER_ENV) for at most `timeout` seconds and return
    the JSON of its last `TAG {json}` line, or {"system", "outcome"} saying why there is none
    (skipped for want of time, timed out, or the exit status and last line of stderr, printed in full)."""
    if timeout < 30:
        return {"system": system, "outcome": "skipped: the call's time budget ran out"}
    prefix = tag + " "
    try:
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **PEER_ENV}, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        lines = [line for line in out.splitlines() if line.startswith(prefix)]
        return json.loads(lines[-1][len(prefix):]) if lines else {"system": system,
                                                                  "outcome": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(prefix)]
    if not lines:
        print(f"{system} printed no result (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"system": system, "outcome": f"exit {done.returncode}: {tail}"}
    result = json.loads(lines[-1][len(prefix):])
    if result.get("outcome") != "ok":
        print(f"{system}: {result.get('outcome')}\n{done.stderr[-3000:]}")
    return result
