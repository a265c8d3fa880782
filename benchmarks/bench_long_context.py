"""Longest trainable context at batch 1: Llama-3.1-8B architecture, QLoRA r16 on all seven
projections, one forward + backward + AdamW step per length, stopping at the first out-of-memory.

    python benchmarks/bench_long_context.py --seq 350000               # ~8 minutes: one device call
    python benchmarks/bench_long_context.py --seq 500000               # ~13 minutes: gpu_session.sh long-start/-wait
    python benchmarks/bench_long_context.py --seq 548000 575000 --probe-layers 6   # memory only, ~5 min each
    python benchmarks/bench_long_context.py --seq 500000 --layers 4    # memory probe, ~8x faster
    python benchmarks/bench_long_context.py --seq 262144 --vs-unsloth  # ~13 minutes: long-start/-wait

Each length's checkpointed layer inputs are placed by velotune's plan (`velotune/placement.py`,
`--keep-on-gpu auto`): as many as the host has room for in pinned host memory, the rest on the GPU.
Every row carries the estimator's figures beside the measured ones
(`velotune.models.long_context`: the GPU peak it predicts for that length and placement, and the
longest length it predicts for this GPU and host), so the rows are the estimator's check.
`--probe-layers N` stops the backward once N layers have run theirs: the GPU peak (the last layers'
backward, with every checkpoint the plan keeps on the GPU still alive) is reached by then, so a
length's fit is measured in the time of a forward and a few layers, not a whole step (the row says
"probe"). The caching allocator runs with expandable segments, so its blocks do not fragment at
these sizes (reserved was 8.6 GiB above allocated at 350,000 tokens without them).

Random bf16 weights built on the GPU, the seven projections quantized to NF4
(`velotune.quant.quantize_linears`), float32 LoRA adapters (r16, alpha 16, dropout 0), bf16
autocast as the trainer runs it, random tokens as labels. Every per-token buffer is kept off the
GPU or bounded: layer inputs checkpointed and offloaded to pinned host memory (models/offload.py),
the MLP tiled over the sequence in forward and backward (models/tiled_mlp.py), the loss through
the chunked linear cross-entropy (no [tokens x vocab] logits), attention through SDPA's flash
kernel (plain causal, no mask tensor). Each row of RESULTS.md gives peak allocated/reserved GiB,
seconds per step, the host memory the offloaded inputs took, or where it ran out.

Expected GPU memory: velotune.models.long_context's module docstring lists the terms. The peak is
in the attention's backward of a recomputed layer, about 116.6 KB a token for this model (measured
116.1 between the 262,144 and 350,000 rows), plus about 5.9 GiB of weights, adapters, their
gradients and AdamW states, plus the inputs the plan keeps on the GPU (8 KB a token each). Host:
32 x 2h = 262,144 B/token would be 122 GiB at 500,000 tokens, more than a 128 GiB host can pin
(MemAvailable less the 4 GiB the offloader leaves), so there the plan keeps the last few layers'
inputs on the GPU: 30 in host memory and 2 on the GPU at 500,000 on a host with 122 GiB available.
`--keep-on-gpu K` fixes K instead (0: every input to the host, refused up front when it cannot).

Time: a step is dominated by attention (~4.5 x 2 x 32 x T^2 x 4096 FLOP, ~1.5e17 at 350,000
tokens): 217.8 s at 262,144 tokens and 330.5 s at 350,000 measured, so ~700 s at 500,000, longer
than one device call (600 s): `benchmarks/gpu_session.sh long-start` runs it in its own process
session and returns after 9 minutes, `long-wait` (the next call, within the machine's 30 s of
warmth) waits for it and returns the rows. The first step also pins the host buffers (faulted in
on all CPU threads while the GPU runs the layers queued before); progress lines (build, forward,
backward) are printed as they happen.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

# Before torch touches CUDA: segments that grow instead of fixed blocks, so a 500,000-token step's
# multi-GiB tensors do not strand memory between blocks of other sizes.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from common import append_row, machine, today  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


def model_config(args: argparse.Namespace):
    from velotune.models.config import ModelConfig
    from velotune.models.known_configs import known_config

    if args.config:
        path = Path(args.config)
        return ModelConfig.from_hf_config(json.loads(path.read_text(encoding="utf-8")), str(path))
    found = known_config(args.model)
    if found is None:
        raise SystemExit(f"unknown model {args.model!r}; see velotune/models/known_configs.py")
    cfg = dict(found[1]["config"])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
        cfg.pop("layer_types", None)
    return ModelConfig.from_hf_config(cfg, args.model)


def build(config, device: torch.device, dtype: torch.dtype, args: argparse.Namespace):
    """The QLoRA model, its AdamW optimizer, with offloaded checkpoints and the tiled MLP."""
    from velotune.lora import LoraConfig, apply_lora, lora_parameters
    from velotune.models.transformer import Transformer
    from velotune.quant import quantize_linears

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # build in 16-bit directly: no float32 copy of 8B weights
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    quantize_linears(model, TARGETS)
    apply_lora(model, LoraConfig(r=16, alpha=16, dropout=0.0, target_modules=TARGETS), dtype=torch.float32)
    model.train()
    model.gradient_checkpointing = True
    model.offload_checkpoints = True
    model.checkpoints_kept_on_gpu = args.keep_on_gpu
    model.keep_attention_outputs = not args.no_keep_attention
    model.mlp_chunk_tokens = args.mlp_chunk
    params = list(lora_parameters(model))
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    return model, optimizer


def host_bytes_needed(config, seq: int, keep_on_gpu: int, itemsize: int = 2) -> int:
    """Pinned host memory the offloaded layer inputs of one step take with `keep_on_gpu` (a number)
    of the last kept on the GPU (batch 1, `itemsize` bytes per value: 2 for bf16), each whole in
    one exact-size buffer (models/offload.py): 85.4 GiB at 350,000 tokens with none kept."""
    return max(config.num_hidden_layers - keep_on_gpu, 0) * seq * config.hidden_size * itemsize


class ProbeStop(Exception):
    """Raised from a gradient hook to end a probe's backward early."""


def stop_backward_after(model, layers: int) -> list:
    """Hooks that stop the backward when it reaches decoder layer L - 1 - `layers` (the first
    gradient of one of its trainable parameters), so only the last `layers` layers run theirs,
    however the layers are checkpointed. Returns the hooks' handles."""
    index = model.config.num_hidden_layers - 1 - layers

    def stop(grad):
        raise ProbeStop()
    return [p.register_hook(stop) for p in model.model.layers[index].parameters() if p.requires_grad]


def step(model, optimizer, seq: int, device: torch.device, amp: bool,
         log: Callable[[str], None] | None = None, probe_layers: int = 0) -> float:
    """One forward + backward + AdamW step on random tokens; returns seconds. With `log`, the
    forward is timed on its own (one extra synchronization) and both halves are reported. With
    `probe_layers`, the backward stops after that many layers (no optimizer step)."""
    g = torch.Generator(device=device).manual_seed(seq)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=device, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    hooks = stop_backward_after(model, probe_layers) if probe_layers else []
    sync()
    start = time.perf_counter()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(ids, labels=ids, return_logits=False)
        if log:
            sync()
            stats = model.offload_stats
            log(f"forward {time.perf_counter() - start:.1f} s; {model.placement.describe()}; host buffers: "
                f"{stats.allocated} new ({stats.allocated_bytes / GIB:.1f} GiB, {stats.allocation_seconds:.1f} s to "
                f"pin), {stats.reused} reused")
        loss = out.loss_sum / out.num_targets
        try:
            loss.backward()
        except ProbeStop:
            pass
        else:
            optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
    optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - start
    if log:
        log(f"{'probe' if probe_layers else 'step'} {seconds:.1f} s, loss {float(loss.detach()):.3f}")
    return seconds


def predicted(config, seq: int, gpu_gib: float, host_gib: float, args: argparse.Namespace):
    """The estimator's figures for this length on this machine (velotune.models.long_context)."""
    from velotune.estimate import Setup
    from velotune.models.long_context import context_estimate

    return context_estimate(config, Setup(method="qlora", lora_r=16), seq, gpu_gib, host_gib, args.keep_on_gpu,
                            not args.no_keep_attention)


def run_unsloth(args: argparse.Namespace) -> dict[int, dict]:
    """Unsloth's step at each length, each in its own process (long_context_peer.py), on a random
    8B checkpoint written once to --workdir (bench_e2e.py's, with SmolLM2's tokenizer from .bench/)."""
    import subprocess
    import sys

    from bench_e2e import write_checkpoint

    folder = write_checkpoint(args.model, Path(args.workdir) / args.model)
    env = {**os.environ, "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    found = {}
    for seq in args.seq:
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("long_context_peer.py")), "--model",
                               str(folder), "--seq", str(seq)], env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("PEER ")]
        found[seq] = (json.loads(lines[-1][5:]) if lines else
                      {"outcome": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"})
        print(f"[unsloth] seq {seq:,}: {found[seq]}", flush=True)
    return found


def record_vs_unsloth(rows: list[dict], peers: dict[int, dict], args: argparse.Namespace) -> None:
    cols = ["date", "machine", "seq", "velotune s/step", "Unsloth s/step", "speed vs Unsloth", "velotune peak GiB",
            "Unsloth peak GiB", "velotune placement", "Unsloth outcome"]
    results = Path(args.results) if args.results else None
    for r in rows:
        peer = peers.get(r["seq"], {})
        ours, theirs = r["seconds"] if r["outcome"] == "ok" else None, peer.get("seconds")
        ratio = f"{theirs / ours:.2f}x" if ours and theirs else "-"
        append_row("Long-context training vs Unsloth (Llama-3.1-8B QLoRA r16, batch 1)", cols,
                   [today(), machine(), f"{r['seq']:,}", "-" if ours is None else f"{ours:.1f}",
                    "-" if theirs is None else f"{theirs:.1f}", ratio,
                    "-" if r["alloc_gib"] is None else f"{r['alloc_gib']:.1f}",
                    "-" if peer.get("peak_gib") is None else f"{peer['peak_gib']:.1f}", r["placement"] or "-",
                    peer.get("outcome", "-")], results)


def run(args: argparse.Namespace) -> list[dict]:
    """One row per length, in order, up to and including the first that does not fit."""
    from velotune.estimate import Setup
    from velotune.models.long_context import longest_context
    from velotune.models.offload import OffloadError, host_memory_bytes, host_reserve_bytes

    def log(message: str) -> None:
        print(f"[long {time.perf_counter() - began:6.1f} s] {message}", flush=True)

    began = time.perf_counter()
    device = torch.device(args.device)
    config = model_config(args)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model, optimizer = build(config, device, dtype, args)
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    log(f"built {config.num_hidden_layers} layers on {device}")
    rows = []
    for seq in args.seq:
        row = dict(seq=seq, layers=config.num_hidden_layers, keep_on_gpu=args.keep_on_gpu, seconds=None,
                   alloc_gib=None, reserved_gib=None, host_offloaded_gib=None, outcome="ok", probe=args.probe_layers,
                   placement=None, est_gib=None, est_longest=None)
        # What the offloader will check: the pool's buffers are reused or released before it
        # allocates, so they count as room.
        total, available = host_memory_bytes()
        room = (available + model.offload_pool.held_bytes - host_reserve_bytes(total)) / GIB
        host_gib = (available + model.offload_pool.held_bytes) / GIB
        if args.keep_on_gpu != "auto":
            need = host_bytes_needed(config, seq, args.keep_on_gpu, dtype.itemsize) / GIB
            if need > room:
                row["outcome"] = (f"host memory: offloaded inputs need {need:.1f} GiB, "
                                  f"{room:.1f} GiB available to them")
                rows.append(row)
                break
        if gpu_gib is not None and dtype == torch.bfloat16 and args.layers == 0:
            est = predicted(config, seq, gpu_gib, host_gib, args)
            row["est_gib"] = est.gpu_total / GIB
            longest, _ = longest_context(config, Setup(method="qlora", lora_r=16), gpu_gib, host_gib, args.keep_on_gpu,
                                         not args.no_keep_attention)
            row["est_longest"] = longest.seq if longest else 0
            log(f"seq {seq:,}: estimator {row['est_gib']:.1f} GiB on the GPU ({est.placement.describe()}); "
                f"longest length it predicts here {row['est_longest']:,}")
        log(f"seq {seq:,}: {room:.1f} GiB of host memory for offloaded inputs")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(args.steps):   # the first also pins the host buffers; later ones reuse them
                row["seconds"] = step(model, optimizer, seq, device, log=log, probe_layers=args.probe_layers,
                                      amp=dtype == torch.bfloat16 and device.type == "cuda")
                row.setdefault("first_seconds", row["seconds"])
        except torch.OutOfMemoryError as exc:
            row["outcome"] = f"GPU OOM ({str(exc).splitlines()[0][:120]})"
        except OffloadError as exc:
            row["outcome"] = f"host OOM ({exc})"
        finally:
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
        if model.placement is not None:
            p = model.placement
            pieces = "/".join(sorted({str(x) for x in p.pieces[:p.offloaded]}))
            row["placement"] = (f"{p.offloaded} host ({pieces} piece) + {p.kept_on_gpu} GPU"
                                + (f"; {sum(p.kept)} keep attention" if any(p.kept) else ""))
        if device.type == "cuda":
            row["alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        row["host_offloaded_gib"] = model.offload_stats.offloaded_bytes / GIB
        row["host_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        rows.append(row)
        print(row, flush=True)
        if row["outcome"] != "ok":
            break
    return rows


def record(rows: list[dict], args: argparse.Namespace) -> None:
    cols = ["date", "machine", "config", "seq", "outcome", "s/step", "first step s", "µs/token", "peak alloc GiB",
            "peak reserved GiB",
            "estimated GiB", "estimated longest", "placement (layers)", "host offloaded GiB", "host max RSS GiB"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    results = Path(args.results) if args.results else None
    for r in rows:
        config = (f"{args.model} QLoRA r16, {r['layers']} layers, batch 1, {args.steps} step(s), "
                  f"offload (keep on GPU: {r['keep_on_gpu']}), "
                  f"tiled MLP ({args.mlp_chunk or 'auto'}), chunked CE, SDPA causal, expandable segments"
                  + (", attention recomputed everywhere" if args.no_keep_attention else "")
                  + (f"; probe: backward of the last {r['probe']} layers only" if r["probe"] else ""))
        per_token = None if r["seconds"] is None or r["probe"] else r["seconds"] / r["seq"] * 1e6
        append_row("Long-context training (QLoRA, batch 1, placed checkpoints)", cols,
                   [today(), machine(), config, f"{r['seq']:,}", r["outcome"],
                    "-" if r["probe"] else fmt(r["seconds"], ".1f"),
                    "-" if r["probe"] else fmt(r.get("first_seconds"), ".1f"), fmt(per_token, ".0f"),
                    fmt(r["alloc_gib"], ".1f"), fmt(r["reserved_gib"], ".1f"), fmt(r["est_gib"], ".1f"),
                    fmt(r["est_longest"], ","), r["placement"] or "-", fmt(r["host_offloaded_gib"], ".1f"),
                    fmt(r.get("host_max_rss_gib"), ".1f")], results)


def keep_on_gpu_arg(text: str) -> int | str:
    if text == "auto":
        return text
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("--keep-on-gpu is auto or a number >= 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.1-8B", help="a bundled config name")
    p.add_argument("--config", help="a config.json instead of --model (tests use a tiny one)")
    p.add_argument("--seq", type=int, nargs="+", default=[65536, 131072, 262144, 350000, 500000])
    p.add_argument("--layers", type=int, default=0, help="override the layer count (0: the model's)")
    p.add_argument("--keep-on-gpu", type=keep_on_gpu_arg, default="auto",
                   help="auto (velotune's placement plan) or the number of last checkpoints kept on the GPU")
    p.add_argument("--mlp-chunk", type=int, default=None, help="MLP tile in tokens (default: automatic)")
    p.add_argument("--no-keep-attention", action="store_true",
                   help="recompute every layer's attention (no attention outputs kept beside parked inputs)")
    p.add_argument("--steps", type=int, default=1,
                   help="steps per length; s/step is the last one's (the first also pins the host buffers)")
    p.add_argument("--probe-layers", type=int, default=0,
                   help="memory probe: stop the backward after this many layers (0: whole steps)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--results", help="append rows to this file instead of benchmarks/RESULTS.md")
    p.add_argument("--vs-unsloth", action="store_true",
                   help="first run Unsloth's step at each length (long_context_peer.py) and record the speed ratio")
    p.add_argument("--workdir", default="/tmp/velotune-long", help="where --vs-unsloth writes its random checkpoint")
    p.add_argument("--no-record", action="store_true", help="print rows only, do not append to RESULTS.md")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (run it on the device machine)")
    peers = run_unsloth(args) if args.vs_unsloth else {}
    rows = run(args)
    if not args.no_record:
        record(rows, args)
        if peers:
            record_vs_unsloth(rows, peers, args)


if __name__ == "__main__":
    main()
