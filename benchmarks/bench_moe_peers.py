"""Mixture-of-experts QLoRA training against Unsloth and transformers + PEFT, same card, same call
(issue 20): Qwen3-30B-A3B and gpt-oss-20b architectures, random weights, micro-batch 1 x 2,048,
checkpointing on; tokens/s over timed steps after warm-up, peak allocated memory; each system in
its own process (Unsloth patches transformers when imported); rows with velotune's ratios to Unsloth.

    python benchmarks/bench_moe_peers.py run --kernels             # peers' kernels, both models, 3 systems
    python benchmarks/bench_moe_peers.py run --models qwen --systems velotune unsloth --layers 4
    python benchmarks/bench_moe_peers.py write --models qwen --layers 2 --workdir DIR   # just the folder

Estimated on an H100 (nothing here has run on one yet): per model, the folder (about 10 s into
/dev/shm, 45-60 s onto a disk), Unsloth 90-120 s (its import and patching, the load with NF4
quantization, its compiles), velotune and transformers 40-60 s each; the peers' kernels about a
minute: 6-8 minutes in all. Unsloth and velotune run on both models before transformers on either,
so the ratios come first. `--budget-s` bounds the whole: a system that cannot start in time gets a
"skipped" row, one that overruns a "timed out" one, and every row is written before the budget ends.

Why the models are cut in depth (`--layers`, default 8: 8 of 48 layers of Qwen3-30B-A3B, 8 of 24 of
gpt-oss-20b; every other field is the real config, and the row names the depth): Unsloth and
transformers load only from a folder, which must be written on the device machine (no internet).
Qwen3-30B-A3B in bf16 is 61 GB and gpt-oss-20b 42 GB, against a 64 GiB disk that also holds the
wheels and the repository (or a /dev/shm of half the host memory), and each system reading the
whole model back would take the call. Pre-quantized NF4 folders were the other way in: but
transformers' bitsandbytes integration quantizes only nn.Linear, so the 3-D expert stacks would
have to be written in Unsloth's own 4-bit expert layout (its zoo patches transformers' quantizer
for them), which cannot be produced or checked here, where Unsloth does not import without a GPU.
Every layer of these models is the same MoE block, so per-layer cost is what differs between
systems; a cut model weighs the embeddings and the 152k/201k-entry head more than the full one
does, equally for all three. 8 layers are 11.2 GB (Qwen) and 15.5 GB (gpt-oss). `--layers 0` runs
the full depth where there is room (checked before writing). The full-depth figures of velotune
alone (the gpt-oss <= 13 GiB target) stay bench_moe.py's, built on the GPU without a folder.

Each system's recipe is in moe_peer.py's docstring.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import bf16_bytes, choose_workdir, folder_for, run_peer, write_folder

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE.parent / ".bench" / "tokenizer"      # SmolLM2's, from `bench_e2e.py prepare`
SYSTEMS = ("unsloth", "velotune", "hf")               # run in this order: Unsloth's row is the ratios' base
PEER = HERE / "moe_peer.py"
WARMUP = 2                                            # moe_peer.py's warm-up steps
KERNEL_SECTION = ("MoE grouped experts, Qwen3-30B-A3B sizes (2,048 tokens x top-8 of 128 experts of 768, bf16, "
                  "fwd+bwd, frozen experts)")                  # bench_moe.py's table: the rows sit together
RECIPES = {
    "velotune": "NF4 attention + experts, LoRA r16 q/k/v/o + per-expert, checkpointing",
    "unsloth": "FastModel load_in_4bit, r16 q/k/v/o/gate/up/down, checkpointing 'unsloth'",
    "hf": "bnb NF4 (nn.Linear only), PEFT r16 q/k/v/o + target_parameters experts, checkpointing",
}
# --tiny: each architecture at toy widths (the CPU smoke run of the whole call; never a result row's size)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, moe_intermediate_size=32, num_experts=8, num_local_experts=8, num_experts_per_tok=2,
            sliding_window=8)


def models() -> dict[str, tuple[str, dict]]:
    from bench_moe import GPT_OSS_20B, QWEN3_30B_A3B

    return {"qwen": ("Qwen3-30B-A3B", QWEN3_30B_A3B), "gptoss": ("gpt-oss-20b", GPT_OSS_20B)}


def truncated(cfg: dict, layers: int, tiny: bool = False) -> dict:
    """The real config with its first `layers` decoder layers (0: all). gpt-oss keeps its pattern
    of sliding layers (even) and full ones (odd), as its config derives it. `tiny`: TINY's widths."""
    if tiny:
        cfg = {**cfg, **{k: v for k, v in TINY.items() if k in cfg}}
    full = cfg["num_hidden_layers"]
    n = layers or full
    if not 1 <= n <= full:
        raise SystemExit(f"--layers {layers}: {cfg['model_type']} has {full} layers (give 1..{full}, or 0 for all)")
    out = {**cfg, "num_hidden_layers": n}
    if cfg["model_type"] == "gpt_oss":
        out["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return out


def label(name: str, cfg: dict, full: dict) -> str:
    n, of = cfg["num_hidden_layers"], full["num_hidden_layers"]
    name = name if cfg["hidden_size"] == full["hidden_size"] else f"{name} at toy widths"
    return name if n == of else f"{name} ({n} of {of} layers)"


# ------------------------------------------------------------------ rows
def kernel_name(r: dict) -> str:
    name = {"unsloth": "Unsloth experts forward", "hf": "transformers 5 experts (grouped_mm)"}[r["system"]]
    if r.get("moe_backend"):
        name += f", backend {r['moe_backend']}"
    return name if r.get("outcome") == "ok" else f"{name}: {r.get('outcome')}"


def ratio(ours: float | None, base: float | None) -> str:
    return f"{ours / base:.2f}x" if ours and base else "n/a"


def format_rows(results: dict[str, dict], model: str, day: str, machine: str) -> list[list[str]]:
    """One row per system; velotune's speed and memory against Unsloth's where both ran."""
    base = results.get("unsloth", {})
    rows = []
    for system, r in results.items():
        ok = r.get("outcome") == "ok"
        rows.append([day, machine, model, system, RECIPES[system],
                     f"{r['tokens_per_s']:.0f}" if ok else "-", f"{r['peak_gib']:.2f}" if ok else "-",
                     f"{r['expert_gib']:.2f}" if "expert_gib" in r else "-",
                     f"{r['trainable'] / 1e6:.2f}M" if "trainable" in r else "-",
                     ratio(r.get("tokens_per_s"), base.get("tokens_per_s")) if ok else "n/a",
                     ratio(r.get("peak_gib"), base.get("peak_gib")) if ok else "n/a",
                     r.get("outcome", "?") + (f"; {r['note']}" if r.get("note") else "")])
    return rows


COLUMNS = ["date", "machine", "model", "system", "recipe", "tokens/s", "peak GiB", "expert GiB", "adapters",
           "speed vs Unsloth", "memory vs Unsloth", "outcome"]


# ------------------------------------------------------------------ the call: every system, each in its process
def run_system(system: str, folder: Path, seq: int, steps: int, device: str, timeout: float) -> dict:
    return run_peer([sys.executable, str(PEER), "step", f"--system={system}", f"--model={folder}", f"--seq={seq}",
                     f"--steps={steps}", f"--device={device}"], "MOE", system, timeout)


def run_kernels(systems: list[str], timeout: float, results: Path | None, where: str) -> None:
    from common import append_row, today

    for system in [s for s in ("unsloth", "hf") if s in systems]:
        r = run_peer([sys.executable, str(PEER), "kernel", f"--system={system}"], "KERNEL", system, timeout)
        ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
        print(f"  {kernel_name(r):60s} fwd+bwd {ms} ms  (rel. diff to velotune {r.get('rel_diff', float('nan')):.1e}; "
              f"forward {r.get('forward')})")
        append_row(KERNEL_SECTION, ["date", "machine", "implementation", "ms"], [today(), where, kernel_name(r), ms],
                   results)


def run(args: argparse.Namespace) -> None:
    import torch

    from common import append_row, machine, today

    deadline = time.monotonic() + args.budget_s
    table = models()
    cfgs = {key: truncated(table[key][1], args.layers, args.tiny) for key in args.models}
    tokenizer = None if args.tokenizer in ("", "none") else Path(args.tokenizer)
    if "unsloth" in args.systems and (tokenizer is None or not (tokenizer / "tokenizer.json").exists()):
        raise SystemExit(f"Unsloth loads a tokenizer with the model: {tokenizer} has no tokenizer.json "
                         "(run `python benchmarks/bench_e2e.py prepare` here and carry .bench)")
    if args.kernels and args.device != "cuda":
        raise SystemExit("--kernels times the peers' expert kernels on the GPU (leave it out with --device cpu)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_moe_peers.py run: no CUDA GPU (give --device cpu for the velotune/hf smoke run)")
    where = machine()
    print(where)
    results_file = Path(args.results) if args.results else None
    if args.kernels:
        print("grouped experts, Qwen3-30B-A3B sizes, peers:")
        run_kernels(args.systems, min(150.0, deadline - time.monotonic()), results_file, where)
    workdir = choose_workdir(args.workdir, sum(bf16_bytes(cfg) for cfg in cfgs.values()), "velotune-moe")
    folders = {}
    for key, cfg in cfgs.items():
        if deadline - time.monotonic() < 90:
            print(f"{label(table[key][0], cfg, table[key][1])}: skipped, the call's time budget ran out")
            continue
        started = time.perf_counter()
        folders[key] = write_folder(cfg, folder_for(cfg, workdir), tokenizer, args.device)
        print(f"{label(table[key][0], cfg, table[key][1])}: folder {folders[key]} ({bf16_bytes(cfg) / 1e9:.1f} GB) "
              f"in {time.perf_counter() - started:.0f} s")
    # Unsloth and velotune on every model before transformers on any: the ratios come first
    order = [(system, key) for phase in (("unsloth", "velotune"), ("hf",)) for key in folders
             for system in phase if system in args.systems]
    results: dict[str, dict[str, dict]] = {key: {} for key in folders}
    for system, key in order:
        r = results[key][system] = run_system(system, folders[key], args.seq, args.steps, args.device,
                                              min(args.system_timeout_s, deadline - time.monotonic()))
        print(f"  {key:6s} {system:9s} {r.get('tokens_per_s', 0):8.0f} tokens/s  peak {r.get('peak_gib', 0):6.2f} GiB  "
              f"experts {r.get('expert_gib', 0):6.2f} GiB  load {r.get('load_s', 0):5.0f} s  {r['outcome']}")
    section = (f"MoE QLoRA training vs Unsloth, same call (micro-batch 1 x {args.seq}, random weights, "
               f"{args.steps} timed steps after {WARMUP} warm-up)")
    for key, by_system in results.items():
        name, full = table[key]
        cfg = cfgs[key]
        ordered = {s: by_system[s] for s in SYSTEMS if s in by_system}
        for row in format_rows(ordered, label(name, cfg, full), today(), where):
            append_row(section, COLUMNS, row, results_file)
        if "velotune" in ordered and "unsloth" in ordered:
            print(f"  {label(name, cfg, full)}: velotune vs Unsloth speed "
                  f"{ratio(ordered['velotune'].get('tokens_per_s'), ordered['unsloth'].get('tokens_per_s'))}, memory "
                  f"{ratio(ordered['velotune'].get('peak_gib'), ordered['unsloth'].get('peak_gib'))}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for command in ("run", "write"):
        c = sub.add_parser(command)
        c.add_argument("--models", nargs="+", choices=("qwen", "gptoss"), default=["qwen", "gptoss"])
        c.add_argument("--layers", type=int, default=8, help="decoder layers kept of each model (0: all)")
        c.add_argument("--workdir", default="auto", help="where the random folders go (auto: /dev/shm if it has room)")
        c.add_argument("--tokenizer", default=str(TOKENIZER), help="tokenizer files copied into each folder ('none')")
        c.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        c.add_argument("--tiny", action="store_true", help="toy widths (the CPU smoke run), same structure")
    c = sub.choices["run"]
    c.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    c.add_argument("--seq", type=int, default=2048)
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--budget-s", type=float, default=540, help="systems not started by then are skipped")
    c.add_argument("--system-timeout-s", type=float, default=240, help="one system on one model at most")
    c.add_argument("--results", default=None, help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    c.add_argument("--kernels", action="store_true",
                   help="first the peers' expert kernels beside bench_moe.py's rows (Unsloth's, transformers' grouped_mm)")
    args = p.parse_args(argv)
    if args.command == "write":
        for key in args.models:
            name, full = models()[key]
            cfg = truncated(full, args.layers, args.tiny)
            tok = None if args.tokenizer in ("", "none") else Path(args.tokenizer)
            folder = write_folder(cfg, folder_for(cfg, choose_workdir(args.workdir, bf16_bytes(cfg), "velotune-moe")),
                                  tok if tok is not None and tok.exists() else None, args.device)
            print(f"{label(name, cfg, full)}: {folder}")
    else:
        run(args)


if __name__ == "__main__":
    main()
