"""`velotune estimate MODEL`: how much GPU memory a fine-tune needs, and what fits on a GPU.

Prints a table of weights, gradients, optimizer states and activations (with and without
gradient checkpointing) in GiB, the activation formula term by term, what each memory saving
does for this model, and with `--gpu-gib` the largest batch and sequence length that fit.
`--seq max` instead gives the longest batch-1 context with offloaded checkpoints on a GPU and host
of the given sizes (`velotune.models.long_context`), where its checkpoints go, and why the next
length fails.
"""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from velotune.estimate import (
    GIB,
    METHODS,
    OPTIMIZERS,
    RESERVED_GIB,
    EstimateError,
    Setup,
    backward_terms,
    checkpoint_term,
    estimate,
    layer_kinds,
    layer_terms,
    model_terms,
    savings,
    what_fits,
)
from velotune.errors import ConfigError
from velotune.models.known_configs import load_config
from velotune.models.long_context import grpo_longest_completion, kv_cache_per_token, longest_context
from velotune.models.offload import host_memory_gib


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "estimate", help="estimate GPU memory for a fine-tune",
        description="Estimate the GPU memory of fine-tuning MODEL (a folder or config.json, a known name such "
                    "as Llama-3-8B, or a Hub id when online) from its config alone.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--method", choices=METHODS, default="qlora")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--seq", type=_seq, default=2048,
                   help="tokens per sequence (default 2048), or max: the longest batch-1 context that trains with "
                        "offloaded checkpoints on --gpu-gib of GPU and --host-gib of host memory")
    p.add_argument("--optim", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing (default on)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--offload-embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the frozen input embeddings in host memory (lora/qlora, untied models; default off)")
    p.add_argument("--gpu-gib", type=float, help="GPU memory in GiB: also report the largest batch and seq that fit")
    p.add_argument("--host-gib", type=float,
                   help="with --seq max: host memory available for pinned checkpoints, GiB (default: this machine's "
                        "MemAvailable)")
    p.add_argument("--grpo-batch", type=int,
                   help="with --seq max: GRPO, this many completions decoded at once (generation_batch_size); "
                        "reports the longest completion that both generation and the update fit")
    p.add_argument("--prompt-tokens", type=int, default=256, help="with --grpo-batch: prompt length (default 256)")
    p.set_defaults(func=run)


def _seq(text: str) -> int | str:
    if text == "max":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seq must be a number of tokens or max, got {text!r}") from None


def run_longest(args: argparse.Namespace, console: Console) -> int:
    """`--seq max`: the longest batch-1 context, where its checkpoints go, and what fails next."""
    if args.gpu_gib is None:
        print("velotune estimate: error: --seq max needs --gpu-gib (the GPU's memory in GiB, e.g. 79.6 for an "
              "H100 80GB)", file=sys.stderr)
        return 2
    host_gib = args.host_gib if args.host_gib is not None else host_memory_gib()[1]
    try:
        config, source = load_config(args.model)
        setup = Setup(method=args.method, optim=args.optim, lora_r=args.lora_r,
                      offload_embeddings=args.offload_embeddings)
        if args.grpo_batch is not None:
            if args.grpo_batch < 1 or args.prompt_tokens < 1:
                raise EstimateError("--grpo-batch and --prompt-tokens must be at least 1")
            return _print_grpo(console, source, config, setup, args, host_gib)
        best, first_failing = longest_context(config, setup, args.gpu_gib, host_gib)
    except (EstimateError, ConfigError) as exc:
        print(f"velotune estimate: error: {exc}", file=sys.stderr)
        return 2
    console.print(f"[bold]{source}[/bold] {setup.method} r{setup.lora_r}, batch 1, every layer checkpointed, "
                  f"checkpoints offloaded, MLP tiled, loss chunked; {args.gpu_gib:g} GiB GPU "
                  f"({RESERVED_GIB:g} GiB kept for the CUDA context), {host_gib:.1f} GiB host memory available")
    if best is None:
        console.print(f"[red]Nothing fits[/red]: {first_failing.why_not()}")
        return 0
    console.print(f"Longest context: [bold]{best.seq:,} tokens[/bold]")
    console.print(f"  GPU {best.gpu_total / GIB:.1f} GiB at its peak ({best.moment}): weights, gradients and "
                  f"optimizer {best.resident / GIB:.1f} + activations {best.activations / GIB:.1f}")
    console.print(f"  {best.placement.describe()}; host {best.host_total / GIB:.1f} GiB of "
                  f"{best.host_budget / GIB:.1f} (the rest is left to the system)")
    if first_failing.seq != best.seq:
        console.print(f"  {first_failing.seq:,} tokens does not fit: {first_failing.why_not()}")
    if best.seq > config.max_position_embeddings:
        console.print(f"  (beyond the model's max_position_embeddings, {config.max_position_embeddings:,}: "
                      "positions past it need RoPE scaling to be meaningful)")
    return 0


def _print_grpo(console: Console, source: str, config, setup: Setup, args: argparse.Namespace,
                host_gib: float) -> int:
    best, nxt = grpo_longest_completion(config, setup, args.prompt_tokens, args.grpo_batch, args.gpu_gib, host_gib)
    console.print(f"[bold]{source}[/bold] GRPO {setup.method} r{setup.lora_r}: {args.grpo_batch} completions decoded "
                  f"at once (generation_batch_size), prompt {args.prompt_tokens:,} tokens, one completion per update "
                  f"micro-batch with offloaded checkpoints; {args.gpu_gib:g} GiB GPU, {host_gib:.1f} GiB host memory")
    if best is None:
        console.print(f"[red]Nothing fits[/red]: {nxt.why_not()}")
        return 0
    console.print(f"Longest completion: [bold]{best.completion:,} tokens[/bold]")
    kv = kv_cache_per_token(config)
    console.print(f"  generation {best.generation_gpu / GIB:.1f} GiB (KV cache {kv:,} B a token); "
                  f"update {best.training.gpu_total / GIB:.1f} GiB, {best.training.placement.describe()}")
    console.print(f"  {nxt.completion:,} tokens does not fit: {nxt.why_not()}")
    return 0


def run(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    if args.seq == "max":
        return run_longest(args, console)
    if args.host_gib is not None or args.grpo_batch is not None:
        print("velotune estimate: error: --host-gib and --grpo-batch apply to --seq max only", file=sys.stderr)
        return 2
    try:
        config, source = load_config(args.model)
        setup = Setup(method=args.method, batch=args.batch, seq=args.seq, optim=args.optim,
                      checkpointing=args.checkpointing, lora_r=args.lora_r, offload_embeddings=args.offload_embeddings)
        fit = what_fits(config, setup, args.gpu_gib) if args.gpu_gib is not None else None
        est = estimate(config, setup)
    except (EstimateError, ConfigError) as exc:
        print(f"velotune estimate: error: {exc}", file=sys.stderr)
        return 2
    tokens = setup.batch * setup.seq

    console.print(f"[bold]{source}[/bold]: {est.parameters:,} parameters, {est.trainable_parameters:,} trainable")
    console.print(f"{setup.method}, batch {setup.batch} x seq {setup.seq} = {tokens:,} tokens, {setup.optim}, "
                  f"checkpointing {'on' if setup.checkpointing else 'off'}")
    table = Table(title="Peak GPU memory (GiB)")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    weights_note = {"full": "bf16", "lora": "bf16 base + fp32 adapters", "qlora": "NF4 projections + bf16 rest + fp32 adapters"}
    rows = [
        ("weights", est.weights, weights_note[setup.method]
         + (" (input embeddings in host memory)" if est.host_weights else "")),
        ("gradients", est.gradients, "bf16" if setup.method == "full" else "fp32 adapters"),
        ("optimizer states", est.optimizer, "AdamW fp32 m, v" if setup.optim == "adamw" else "8-bit AdamW"),
        ("activations, checkpointing", est.activations_checkpointed, "used" if setup.checkpointing else ""),
        ("activations, no checkpointing", est.activations_full, "" if setup.checkpointing else "used"),
        ("backward peak", est.backward_peak, "gradients + what is left of the activations"),
    ]
    table.add_column("")
    for name, value, note in rows:
        table.add_row(name, f"{value / GIB:.2f}", note)
    table.add_row("[bold]total[/bold]", f"[bold]{est.total / GIB:.2f}[/bold]",
                  "weights + optimizer + max(activations, backward peak)")
    console.print(table)
    if est.host_weights:
        console.print(f"In host memory, not counted above: input embeddings {est.host_weights / GIB:.2f} GiB "
                      "(--offload-embeddings)")
    console.print("Activations peak at the end of the forward pass, gradients at the end of the backward "
                  "pass, so the two are not added.")

    console.print(f"Activation formula, T = batch x seq = {tokens:,} tokens, bf16 (2 B), f32 (4 B); "
                  "GiB for all layers:")
    terms = Table(show_header=True, box=None, padding=(0, 1))
    terms.add_column("kept for backward, per layer")
    terms.add_column("GiB", justify="right")
    layers = config.num_hidden_layers
    kinds = layer_kinds(config)
    for moe in sorted(set(kinds)):
        count = kinds.count(moe)
        if len(set(kinds)) > 1 or moe:
            terms.add_row(f"[italic]{count} {'mixture-of-experts' if moe else 'dense'} layers[/italic]", "")
        for term in layer_terms(config, setup, moe=moe):
            terms.add_row(term.what, f"{count * term.bytes(tokens) / GIB:.2f}")
    terms.add_row("[italic]model-wide[/italic]", "")
    for term in model_terms(config, setup):
        terms.add_row(term.what, f"{term.bytes(tokens) / GIB:.2f}")
    terms.add_row("[italic]with checkpointing, instead of the per-layer terms[/italic]", "")
    ckpt = checkpoint_term(config, setup)
    terms.add_row(ckpt.what, f"{ckpt.bytes(tokens) / GIB:.2f}")
    for moe in sorted(set(kinds)):
        kind = f", {'mixture-of-experts' if moe else 'dense'} layer" if len(set(kinds)) > 1 or moe else ""
        terms.add_row(f"[italic]backward temporaries (Tmp){kind}[/italic]", "")
        for term in backward_terms(config, setup, moe=moe):
            terms.add_row(term.what, f"{term.bytes(tokens) / GIB:.2f}")
    console.print(terms)
    console.print(f"  forward end: no checkpointing = L ({layers}) x per layer + model-wide; checkpointing = "
                  "layer inputs + max(model-wide, one layer)")
    console.print("  backward peak = max(saved + head gradient + Tmp (+ one recomputed layer), "
                  "gradients - embedding gradient + one layer + Tmp, gradients)")

    console.print("What each saving does here:")
    for s in savings(config, setup):
        mark = " (in use)" if s.in_use else ""
        console.print(f"  {s.name}{mark}: {s.part} {s.without / GIB:.2f} -> {s.with_ / GIB:.2f} GiB; {s.how}")

    if fit is not None:
        budget = f"{fit.budget_gib:g} GiB GPU ({RESERVED_GIB:g} GiB kept for CUDA context and fragmentation)"
        if fit.max_seq == 0:
            console.print(f"[red]Does not fit[/red] on {budget}, not even batch 1 x seq 1.")
            return 0
        if fit.max_batch == 0:
            console.print(f"On {budget}: batch 1 does not fit at seq {setup.seq}")
        else:
            console.print(f"On {budget}: largest batch at seq {setup.seq} = {fit.max_batch}")
        capped = " (the model's max_position_embeddings)" if fit.seq_capped else ""
        console.print(f"  largest seq at batch 1 = {fit.max_seq:,}{capped}")
    return 0
