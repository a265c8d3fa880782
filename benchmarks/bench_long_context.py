"""Longest trainable context at batch 1: Llama-3.1-8B architecture, QLoRA r16 on all seven
projections, one forward + backward + AdamW step per length, stopping at the first out-of-memory.

    python benchmarks/bench_long_context.py --seq 350000               # ~8 minutes: one device call
    python benchmarks/bench_long_context.py --seq 65536 131072 262144  # ~5 minutes of steps
    python benchmarks/bench_long_context.py --seq 500000 --layers 4    # memory probe, ~8x faster

Random bf16 weights built on the GPU, the seven projections quantized to NF4
(`velotune.quant.quantize_linears`), float32 LoRA adapters (r16, alpha 16, dropout 0), bf16
autocast as the trainer runs it, random tokens as labels. Every per-token buffer is kept off the
GPU or bounded: layer inputs checkpointed and offloaded to pinned host memory (models/offload.py),
the MLP tiled over the sequence in forward and backward (models/tiled_mlp.py), the loss through
the chunked linear cross-entropy (no [tokens x vocab] logits), attention through SDPA's flash
kernel (plain causal, no mask tensor). Each row of RESULTS.md gives peak allocated/reserved GiB,
seconds per step, the host memory the offloaded inputs took, or where it ran out.

Expected GPU bytes per token (h 4096, q 4096, kv 1024, i 14336, 32 heads, r 16; 2 B = bf16):
  whole step      ids and position ids (int64) 16; RoPE cos and sin for every position 2 x 2 x 128
                  = 512; labels/targets/keep mask 17                                   ~    545
  end of forward  the checkpoint being copied out 2h = 8,192; final norm input and output, the
                  gathered target rows, the loss's hidden-gradient buffer and one logits chunk
                  sized like the hidden states, 5 x 2h = 40,960                      ~ 49,152
  backward peak   (the larger; reached in each layer's backward)
                  residual-stream gradient in and out, 2 x 2h                          16,384
                  the recomputed layer, MLP tiled: x, norm1, q, attention output, x_mid,
                  norm2 6 x 2h = 49,152; k, v 2 x 2kv = 4,096; rstd 8; flash log-sum-exp
                  4 x 32 = 128; LoRA x @ A 7 x 2r = 224                               53,608
                  the previous layer's input, prefetched                               8,192
                  its backward's activation gradients (q, k, v, attention, norms)     ~28,672
                  float32 copies of a projection input for the float32 adapters 4h    16,384
                  (the MLP's [chunk x 14336] tensors are per chunk, not per token: ~0.7 GiB)
                                                                                ~ 123,800 B/token
Resident: NF4 projections 3.5 GiB + bf16 embeddings and head 1.96 GiB + norms; 42M float32 adapter
values with gradients and AdamW states (16 B each) 0.63 GiB: about 6.1 GiB.
GPU estimate: 6.1 GiB + 123.8 KB x T, so 350,000 tokens ~ 46.5 GiB and the 80 GB card (77.7 GiB
usable) runs out near 620,000 tokens. The host binds first: the offloaded inputs take
32 x 2h = 262,144 B/token of pinned host memory, exactly (models/offload.py pins exact-size
buffers with cudaHostRegister, allocated in the first step and reused after; torch's
`pin_memory=True` rounded each up to a power of two, 128 GiB at 350,000 tokens, which the 125 GiB
GPU box could not hold): 64 GiB at 262,144 tokens (measured: 217.8 s/step, 33.9 GiB GPU),
85.4 GiB at 350,000, 122 GiB at 500,000. A length is refused up front (and the offloader itself
raises OffloadError) when that exceeds MemAvailable, plus what the pool already holds, less
the 4 GiB the offloader leaves to the rest of the host. `--keep-on-gpu K` keeps the last K
checkpoints on the GPU (8 KB/token each) and trades host for GPU memory.

Time: a step is dominated by attention (~4.5 x 2 x 32 x T^2 x 4096 FLOP, ~1.5e17 at 350,000
tokens): 217.8 s at 262,144 tokens, so ~390 s at 350,000; the first step also pins the host
buffers (faulted in on all CPU threads while the GPU runs the layers queued before). One length
per device call (`--seq 350000`, 600 s) leaves about three minutes for start-up and the model
build; progress lines (build, forward, backward) are printed as they happen.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import append_row, machine, today

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
    model.mlp_chunk_tokens = args.mlp_chunk
    params = list(lora_parameters(model))
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    return model, optimizer


def host_bytes_needed(config, seq: int, keep_on_gpu: int, itemsize: int = 2) -> int:
    """Pinned host memory the offloaded layer inputs of one step take (batch 1, `itemsize` bytes
    per value: 2 for bf16): one exact-size buffer per offloaded layer (models/offload.py),
    85.4 GiB at 350,000 tokens."""
    return max(config.num_hidden_layers - keep_on_gpu, 0) * seq * config.hidden_size * itemsize


def step(model, optimizer, seq: int, device: torch.device, amp: bool,
         log: Callable[[str], None] | None = None) -> float:
    """One forward + backward + AdamW step on random tokens; returns seconds. With `log`, the
    forward is timed on its own (one extra synchronization) and both halves are reported."""
    g = torch.Generator(device=device).manual_seed(seq)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=device, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(ids, labels=ids, return_logits=False)
    if log:
        sync()
        stats = model.offload_stats
        log(f"forward {time.perf_counter() - start:.1f} s; host buffers: {stats.allocated} new "
            f"({stats.allocated_bytes / GIB:.1f} GiB, {stats.allocation_seconds:.1f} s to pin), {stats.reused} reused")
    loss = out.loss_sum / out.num_targets
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - start
    if log:
        log(f"step {seconds:.1f} s, loss {float(loss.detach()):.3f}")
    return seconds


def run(args: argparse.Namespace) -> list[dict]:
    """One row per length, in order, up to and including the first that does not fit."""
    from velotune.models.offload import OffloadError, host_memory_bytes, host_reserve_bytes

    def log(message: str) -> None:
        print(f"[long {time.perf_counter() - began:6.1f} s] {message}", flush=True)

    began = time.perf_counter()
    device = torch.device(args.device)
    config = model_config(args)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model, optimizer = build(config, device, dtype, args)
    log(f"built {config.num_hidden_layers} layers on {device}")
    rows = []
    for seq in args.seq:
        row = dict(seq=seq, layers=config.num_hidden_layers, keep_on_gpu=args.keep_on_gpu, seconds=None,
                   alloc_gib=None, reserved_gib=None, host_offloaded_gib=None, outcome="ok")
        # What the offloader will check: the pool's buffers are reused or released before it
        # allocates, so they count as room.
        total, available = host_memory_bytes()
        room = (available + model.offload_pool.held_bytes - host_reserve_bytes(total)) / GIB
        need = host_bytes_needed(config, seq, args.keep_on_gpu, dtype.itemsize) / GIB
        if need > room:
            row["outcome"] = (f"host memory: offloaded inputs need {need:.1f} GiB, "
                              f"{room:.1f} GiB available to them")
            rows.append(row)
            break
        log(f"seq {seq:,}: {need:.1f} GiB of offloaded inputs, {room:.1f} GiB of host memory for them")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            row["seconds"] = step(model, optimizer, seq, device, log=log,
                                  amp=dtype == torch.bfloat16 and device.type == "cuda")
        except torch.OutOfMemoryError as exc:
            row["outcome"] = f"GPU OOM ({str(exc).splitlines()[0][:120]})"
        except OffloadError as exc:
            row["outcome"] = f"host OOM ({exc})"
        finally:
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
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
    cols = ["date", "machine", "config", "seq", "outcome", "s/step", "peak alloc GiB", "peak reserved GiB",
            "host offloaded GiB", "host max RSS GiB"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        config = (f"{args.model} QLoRA r16, {r['layers']} layers, batch 1, offload (last {r['keep_on_gpu']} kept), "
                  f"tiled MLP ({args.mlp_chunk or 'auto'}), chunked CE, SDPA causal")
        append_row("Long-context training (QLoRA, batch 1)", cols,
                   [today(), machine(), config, f"{r['seq']:,}", r["outcome"], fmt(r["seconds"], ".1f"),
                    fmt(r["alloc_gib"], ".1f"), fmt(r["reserved_gib"], ".1f"), fmt(r["host_offloaded_gib"], ".1f"),
                    fmt(r.get("host_max_rss_gib"), ".1f")])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.1-8B", help="a bundled config name")
    p.add_argument("--config", help="a config.json instead of --model (tests use a tiny one)")
    p.add_argument("--seq", type=int, nargs="+", default=[65536, 131072, 262144, 350000, 500000])
    p.add_argument("--layers", type=int, default=0, help="override the layer count (0: the model's)")
    p.add_argument("--keep-on-gpu", type=int, default=0, help="last K checkpoints stay on the GPU")
    p.add_argument("--mlp-chunk", type=int, default=None, help="MLP tile in tokens (default: automatic)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--no-record", action="store_true", help="print rows only, do not append to RESULTS.md")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (run it on the device machine)")
    rows = run(args)
    if not args.no_record:
        record(rows, args)


if __name__ == "__main__":
    main()
