"""LoRA / QLoRA training throughput and memory: velotune vs transformers + PEFT, same loop.

Both systems run, in this one process, the same plain loop on the same random-weight model
(a real architecture config: Llama-3.1-8B or Llama-3.2-1B) and the same random tokens:
forward, backward, AdamW step. transformers uses sdpa attention and gradient checkpointing;
velotune uses its defaults (kernels on, checkpointing on). Each row in RESULTS.md gives
tokens/s, ms/step, peak allocated and reserved memory, MFU against the bf16 matmul rate measured
in the same run, and velotune's ratios to transformers.

QLoRA (--qlora): transformers cannot quantize a model built from a config, so the random bf16
model is saved once to a folder on local disk (--workdir; 16 GB for 8B) and both systems load it:
transformers with bitsandbytes NF4 (double quantization, bf16 compute) and the LoRA reference's
set-up (gradient checkpointing with use_reentrant=False, inputs requiring grad; the embeddings and
head stay bf16, as velotune's do), velotune with
`load_model(..., load_in_4bit=True)`. Both then put r=16 adapters on the seven projections.

Every velotune row also gets the memory estimator's prediction (`velotune.estimate`, same model,
method, batch, seq, AdamW, checkpointing on) and the ratio measured/predicted, in the section
"Estimator vs measured peak": the target is a ratio within 0.90-1.10.

    python benchmarks/bench_train.py --model Llama-3.1-8B --batch 1 4 --seq 2048 [--qlora]

velotune replays each micro-batch's forward and backward from a CUDA graph (what its trainer does
for fixed-shape micro-batches, `cuda_graphs`; train/graphed_step.py); `--no-graphs` runs it eagerly.
The graph's first three calls (eager warm-up, timed eager, capture and timed replay) fall in the
three warm-up steps that every system gets. As its trainer
does by default (`offload_embeddings: auto`), velotune keeps the frozen input embedding table in
host memory (0.98 GiB for Llama 3's 128k vocabulary); `--no-offload-embeddings` keeps it on the GPU.

`--checkpointing auto` (velotune checkpoints only as many layers as the GPU's memory needs, and
prints how many) and `--offload` (checkpointed inputs to pinned host memory, under CUDA graphs
too) change velotune's side only; transformers keeps checkpointing on. Those rows skip the
estimator comparison. `--workdir DIR` keeps the random QLoRA checkpoint for the next run.

    python benchmarks/bench_train.py --model Llama-3.1-8B --batch 4 --checkpointing auto

`--vs-unsloth` compares velotune with Unsloth instead, each system in its own process
(benchmarks/loop_peer.py; Unsloth's import patches transformers and torch), in this same loop on
the same random-weight folder (written once on the GPU with SmolLM2's tokenizer from .bench/, into
/dev/shm where it fits, and kept for the next call) and the same tokens. velotune runs as the model a user's own loop calls (its
own `cuda_graphs` default, models/loop_graphs.py; `--no-graphs`: eager) with its trainer's
memory defaults, Unsloth with its
recommended settings and optimizer; loop_peer.py's docstring lists both. Rows go to "Plain
training loop vs Unsloth" with velotune's speed and memory as ratios to Unsloth's; `--budget-s`
skips what cannot start in time. `--smoke` runs it all on the CPU at toy widths.

    python benchmarks/bench_train.py --vs-unsloth --model Llama-3.1-8B --batch 1 4 [--qlora] --budget-s 550
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import (append_row, bf16_bytes, bf16_matmul_tflops, choose_workdir, folder_for, machine, require_cuda,
                    run_peer, today, train_flops_per_token, transformers_config, write_folder)

WARMUP = 3   # steps before timing, for every system
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEER = Path(__file__).with_name("loop_peer.py")                          # --vs-unsloth: one system per process
TOKENIZER = Path(__file__).resolve().parent.parent / ".bench" / "tokenizer"  # SmolLM2's (bench_e2e.py prepare)
# --smoke: the named architecture at toy widths (vocabulary, rope and tying kept), on the CPU
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16)
LOOP_SECTION = "Plain training loop vs Unsloth (a user's own loop, each system in its own process)"
LOOP_COLUMNS = ["date", "device", "config", "system", "set-up", "optimizer", "tokens/s", "ms/step", "peak alloc GiB",
                "speed vs Unsloth", "memory vs Unsloth", "outcome"]


def hf_config(name: str) -> dict:
    from velotune.models.known_configs import known_config

    found = known_config(name)
    if found is None:
        raise SystemExit(f"unknown model {name!r}; see velotune/models/known_configs.py")
    return dict(found[1]["config"])


def save_random_checkpoint(cfg: dict, folder: Path) -> Path:
    """The random bf16 model both QLoRA systems load (transformers quantizes only while loading).
    A complete one already in `folder` (a reused --workdir) is kept: writing 16 GB takes a minute."""
    import transformers

    if (folder / "model.safetensors.index.json").exists():
        return folder
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(transformers_config(cfg), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def velotune_system(cfg: dict | None, qlora: bool, folder: Path | None = None, checkpointing: str = "on",
                    offload: bool = False, graphs: bool = True, host_embeddings: bool = True, device: str = "cuda",
                    loop_graphs: bool = False):
    """velotune's model, its step and its config: loaded from `folder` when given (its loader's
    dtype for `device`: bf16 on a GPU), else built in bf16 on the GPU from `cfg`. `graphs`: the
    trainer's graphed micro-step (train/graphed_step.py); `loop_graphs`: without it, the model's own
    graphs of repeated shapes (`Transformer.cuda_graphs`, on by default in a user's loop)."""
    import velotune
    from velotune.lora import LoraConfig, apply_lora
    from velotune.models.config import ModelConfig
    from velotune.models.transformer import Transformer
    from velotune.models.loop_graphs import graph_blockers
    from velotune.train.graphed_step import GraphedMicroStep

    if folder is not None:  # qlora: quantized layer by layer while the saved checkpoint streams in
        model, _ = velotune.load_model(folder, device=device, load_in_4bit=qlora)
        config = model.config
    else:
        config = ModelConfig.from_hf_config(cfg, "bench")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no float32 copy of 8B weights
        try:
            with torch.device("cuda"):
                model = Transformer(config)
        finally:
            torch.set_default_dtype(previous)
    # on | off | auto (as many layers as this GPU's memory needs; the choice is printed)
    model.gradient_checkpointing = {"on": True, "off": False, "auto": "auto"}[checkpointing]
    model.offload_checkpoints = offload
    model.cuda_graphs = loop_graphs and not graphs
    # float32 adapters over the bf16 base, as PEFT does by default (autocast_adapter_dtype)
    apply_lora(model, LoraConfig(r=16, alpha=16, dropout=0.0, target_modules=TARGETS), dtype=torch.float32)

    if host_embeddings:   # the trainer's offload_embeddings: auto (frozen, untied table in host memory)
        model.put_embeddings_on_host("auto")
    graphed = None
    if graphs and not graph_blockers(model):
        graphed = GraphedMicroStep(model, [p for p in model.parameters() if p.requires_grad])

    def step(ids):
        if graphed is not None:   # fixed-shape micro-batches, as the trainer replays them (cuda_graphs)
            graphed(ids, ids, None, 1.0 / (ids.shape[0] * (ids.shape[1] - 1)))
            decided = all(t is not None for t in graphed.timings.values())
            if decided and not getattr(step, "graph_told", False):   # captured and replayed
                print(graphed.describe())
                step.graph_told = True
        else:
            ids = ids.to(device, non_blocking=True)
            out = model(ids, labels=ids)   # a user's call: the loss, no logits (return_logits defaults so)
            (out.loss_sum / out.num_targets).backward()
        if model.checkpoint_choice is not None and not getattr(step, "announced", False):
            print(model.checkpoint_choice.describe())
            step.announced = True

    return model, step, config


def transformers_system(cfg: dict, qlora: bool, folder: Path | None = None):
    import peft
    import transformers

    kwargs = dict(attn_implementation="sdpa", dtype=torch.bfloat16)
    if qlora:
        nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4,
                                                                  device_map={"": 0}, **kwargs)
    else:
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(transformers_config(cfg), **kwargs)
    # The same set-up for LoRA and QLoRA. Not peft.prepare_model_for_kbit_training: it also
    # upcasts the embeddings and head to float32 (a float32 [tokens x 128k] head matmul): the
    # first QLoRA reference rows, made with it, ran at 2,632 tokens/s on 8B micro-batch 4,
    # against 6,010 for the LoRA reference.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))

    def step(ids):
        ids = ids.to("cuda", non_blocking=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return model, step


def fused_adamw(params: list) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


def measure(build, batch: int, seq: int, vocab: int, steps: int, optimizer=fused_adamw, device: str = "cuda") -> dict:
    """`build()`'s model and step in the plain loop (host batches, step, `optimizer` step): WARMUP
    steps, then `steps` timed; peak memory on a GPU (0 on the CPU, the smoke runs)."""
    cuda = device == "cuda"
    gc.collect()
    torch.cuda.empty_cache()
    # Memory still held when this system starts (nothing, unless an earlier system leaked) is
    # not this system's: it is subtracted from the peaks and printed, so a leak shows up instead
    # of inflating the next row.
    leftover = torch.cuda.memory_allocated()
    if leftover > 2**28:
        print(f"note: {leftover / 2**30:.2f} GiB still allocated before building this system")
    built = build()
    model, step = built[0], built[1]
    # Training mode for every system: from_pretrained returns an eval-mode model, and
    # transformers checkpoints only in training mode (the first QLoRA reference rows, made
    # without this, ran with checkpointing silently off).
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the loop's peak, not the one-off construction's
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    # On the host, as a data loader delivers them; each system copies them to the GPU itself.
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps + WARMUP)]
    batches = [ids.pin_memory() for ids in batches] if cuda else batches
    try:
        for i, ids in enumerate(batches):
            if i == WARMUP:  # compilation, autotuning, allocator growth, velotune's graph choice
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            step(ids)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        return dict(ms=seconds * 1e3, tok_s=batch * seq / seconds,
                    alloc=(torch.cuda.max_memory_allocated() - leftover) / 2**30,
                    reserved=(torch.cuda.max_memory_reserved() - leftover) / 2**30)
    except torch.OutOfMemoryError:
        return dict(ms=float("nan"), tok_s=0.0, alloc=float("nan"), reserved=float("nan"), oom=True)
    finally:
        del model, step, opt, built
        gc.collect()
        torch.cuda.empty_cache()


def estimator_row(config, method: str, batch: int, seq: int, measured_gib: float,
                  host_embeddings: bool) -> tuple[float, str]:
    """The estimator's peak for this run (AdamW, checkpointing on, r=16) and measured/predicted."""
    from velotune.estimate import GIB, Setup, estimate

    predicted = estimate(config, Setup(method=method, batch=batch, seq=seq, optim="adamw", checkpointing=True,
                                       lora_r=16, offload_embeddings=host_embeddings and not config.tie_word_embeddings,
                                       )).total / GIB
    return predicted, f"{measured_gib / predicted:.3f}" if measured_gib == measured_gib else "OOM"


def peer_command(system: str, folder: Path, batch: int, args: argparse.Namespace, device: str) -> list[str]:
    """loop_peer.py's command line for `system`; velotune's memory options go to velotune only."""
    command = [sys.executable, str(PEER), f"--system={system}", f"--model={folder}", f"--batch={batch}",
               f"--seq={args.seq}", f"--steps={args.steps}", f"--device={device}", *(["--qlora"] if args.qlora else [])]
    if system == "velotune":
        command += [f"--checkpointing={args.checkpointing}", *(["--offload"] if args.offload else []),
                    *(["--eager"] if args.no_graphs else []),
                    *(["--no-offload-embeddings"] if args.no_offload_embeddings else [])]
    return command


def ratio_to(ours: dict, base: dict, key: str, digits: int) -> str:
    ok = ours.get("outcome") == base.get("outcome") == "ok" and base.get(key)
    return f"{ours[key] / base[key]:.{digits}f}x" if ok else "n/a"


def loop_rows(results: dict[str, dict], config: str, day: str, where: str) -> list[list[str]]:
    """One row per system in `results` (Unsloth's first); velotune's speed and memory as ratios to
    Unsloth's, where both ran (memory to three decimals: the target is a limit, at most 1x)."""
    base = results.get("unsloth", {})
    rows = []
    for system, r in results.items():
        ok = r.get("outcome") == "ok"
        ours = system == "velotune"
        rows.append([day, where, config, r.get("version", system), r.get("setup", "-"), r.get("optimizer", "-"),
                     f"{r['tok_s']:,.0f}" if ok else "-", f"{r['ms']:.0f}" if ok else "-",
                     f"{r['alloc']:.2f}" if ok else "-", ratio_to(r, base, "tok_s", 2) if ours else "-",
                     ratio_to(r, base, "alloc", 3) if ours else "-", r.get("outcome", "?")])
    return rows


def vs_unsloth(args: argparse.Namespace, cfg: dict) -> None:
    """--vs-unsloth: the random bf16 folder written once (on the GPU, into /dev/shm where it fits),
    then for each micro-batch Unsloth and velotune, each in its own process (loop_peer.py), and
    their rows. `--smoke`: the same on the CPU at toy widths (rows into WORKDIR/RESULTS.md unless
    --results), where Unsloth's failure is the row's outcome."""
    deadline = time.monotonic() + args.budget_s
    device = "cpu" if args.smoke else "cuda"
    tokenizer = TOKENIZER if (TOKENIZER / "tokenizer.json").exists() else None
    if args.smoke:
        cfg = {**cfg, **TOY}
    elif tokenizer is None:
        raise SystemExit(f"Unsloth loads a tokenizer with the model: {TOKENIZER} has no tokenizer.json "
                         "(run `python benchmarks/bench_e2e.py prepare` here and carry .bench)")
    else:
        require_cuda()
    workdir = choose_workdir(str(args.workdir or "auto"), bf16_bytes(cfg), "velotune-loop")
    started = time.perf_counter()
    folder = write_folder(cfg, folder_for(cfg, workdir), tokenizer, device)
    print(f"folder {folder} ({bf16_bytes(cfg) / 1e9:.1f} GB) in {time.perf_counter() - started:.0f} s", flush=True)
    results = args.results or (workdir / "RESULTS.md" if args.smoke else None)
    where = machine()
    name = f"{args.model} at toy widths" if args.smoke else args.model
    for batch in args.batch:
        found = {system: run_peer(peer_command(system, folder, batch, args, device), "LOOP", system,
                                  deadline - time.monotonic()) for system in ("unsloth", "velotune")}
        config = (f"{name} {'QLoRA' if args.qlora else 'LoRA'} r16 seq {args.seq} micro-batch {batch}, "
                  f"{WARMUP} warm-up + {args.steps} timed steps")
        for row in loop_rows(found, config, today(), where):
            append_row(LOOP_SECTION, LOOP_COLUMNS, row, results)
            print("  " + " | ".join(row[2:4] + row[6:]), flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--checkpointing", choices=("on", "off", "auto"), default="on",
                   help="velotune's checkpointing (transformers keeps it on); auto: as memory needs")
    p.add_argument("--offload", action="store_true", help="velotune: checkpointed inputs to pinned host memory")
    p.add_argument("--no-graphs", action="store_true", help="velotune: no CUDA graphs (eager forward and backward)")
    p.add_argument("--no-offload-embeddings", action="store_true",
                   help="velotune: keep the input embedding table on the GPU")
    p.add_argument("--workdir", type=Path, default=None,
                   help="--qlora: where the random bf16 checkpoint is saved (default: a temporary folder, removed after); "
                        "--vs-unsloth: where its folder is written and kept (default: /dev/shm where it fits, else /tmp)")
    p.add_argument("--vs-unsloth", action="store_true",
                   help="velotune in a user's own loop and Unsloth, each in its own process (loop_peer.py), one random folder")
    p.add_argument("--smoke", action="store_true", help="--vs-unsloth on the CPU at toy widths")
    p.add_argument("--budget-s", type=float, default=3600,
                   help="--vs-unsloth: seconds for the whole run; a system that cannot start by then is skipped")
    p.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    cfg = hf_config(args.model)
    if args.smoke and not args.vs_unsloth:
        p.error("--smoke is the CPU run of --vs-unsloth: give both")
    if args.vs_unsloth:
        vs_unsloth(args, cfg)
        return
    require_cuda()
    peak = bf16_matmul_tflops()
    from velotune.models.config import ModelConfig

    model_config = ModelConfig.from_hf_config(cfg, args.model)
    flops_tok = train_flops_per_token(model_config, args.seq)
    method = "QLoRA" if args.qlora else "LoRA"
    cols = ["date", "machine", "config", "system", "tokens/s", "ms/step", "peak alloc GiB",
            "peak reserved GiB", "MFU", "speed ratio", "memory ratio"]
    est_cols = ["date", "machine", "config", "measured peak alloc GiB", "estimated GiB", "measured / estimated"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="velotune-bench-"))
    folder = save_random_checkpoint(cfg, workdir / args.model) if args.qlora else None
    try:
        for batch in args.batch:
            ref = measure(lambda: transformers_system(cfg, args.qlora, folder), batch, args.seq, cfg["vocab_size"],
                          args.steps)
            ours = measure(lambda: velotune_system(cfg, args.qlora, folder, args.checkpointing, args.offload,
                                                   not args.no_graphs, not args.no_offload_embeddings),
                           batch, args.seq, cfg["vocab_size"], args.steps)
            ckpt = (f"ckpt {args.checkpointing}" + (" + offload" if args.offload else "")
                    + (", eager" if args.no_graphs else ", CUDA graphs")
                    + ("" if args.no_offload_embeddings else ", embeddings in host memory"))
            config = (f"{args.model} {method} r16 seq {args.seq} micro-batch {batch} {ckpt}, "
                      f"bf16 matmul {peak:.0f} TFLOP/s")
            for name, r in (("transformers+PEFT", ref), ("velotune", ours)):
                mfu = r["tok_s"] * flops_tok / (peak * 1e12)
                ratio = ((f"{ours['tok_s'] / ref['tok_s']:.2f}x" if ref["tok_s"] else "ref OOM")
                         if name == "velotune" else "1.00x")
                # three decimals: the targets are limits (at most 0.8x), which two would round across
                mem = f"{ours['alloc'] / ref['alloc']:.3f}x" if name == "velotune" and ref["tok_s"] else "1.000x"
                row = [today(), machine(), config, name, f"{r['tok_s']:,.0f}", f"{r['ms']:.0f}", f"{r['alloc']:.2f}",
                       f"{r['reserved']:.1f}", f"{mfu:.1%}", ratio, mem]
                append_row(f"Training throughput ({method})", cols, row, args.results)
                print(" | ".join(row[2:]))
            if args.checkpointing != "on" or args.offload:
                continue   # the estimator's rows are for its own setting: every layer checkpointed, on the GPU
            predicted, est_ratio = estimator_row(model_config, method.lower(), batch, args.seq, ours["alloc"],
                                                  not args.no_offload_embeddings)
            est = [today(), machine(), f"velotune {config}", f"{ours['alloc']:.2f}", f"{predicted:.2f}", est_ratio]
            append_row("Estimator vs measured peak", est_cols, est, args.results)
            print(" | ".join(est[2:]))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
