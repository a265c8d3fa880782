"""Mixture-of-experts QLoRA training against Unsloth and transformers + PEFT, same card, same call
(issue 20): Qwen3-30B-A3B and gpt-oss-20b architectures, random weights, micro-batch 1 x 2,048,
checkpointing on; tokens/s over timed steps after warm-up, peak allocated memory; each system in
its own process; rows with velotune's ratios to Unsloth.

    python benchmarks/moe_peer.py run                       # both models, all three systems (~6-7 min)
    python benchmarks/moe_peer.py run --models qwen --systems velotune unsloth --layers 4
    python benchmarks/moe_peer.py write --models qwen --layers 2 --workdir DIR   # just the folder
    python benchmarks/moe_peer.py step --system unsloth --model DIR             # one system, prints MOE {json}

Why the models are cut in depth (`--layers`, default 8 of 48 for Qwen3-30B-A3B and 8 of 24 for
gpt-oss-20b; every other field is the real config, and the row names the depth): Unsloth and
transformers only load from a folder, and a random folder must be written on the device machine
(no internet, nothing carried that large). Qwen3-30B-A3B in bf16 is 61 GB, gpt-oss-20b 42 GB,
against a 64 GiB disk that also holds the wheels and the repository, and writing at about 0.27 GB/s
(bench_train.py's 16 GB in a minute) plus each system reading it back would take the whole call.
Pre-quantized NF4 folders were the other way: transformers' bitsandbytes integration quantizes
only nn.Linear, so the 3-D expert stacks would have to be written in Unsloth's own 4-bit expert
layout (its zoo patches transformers' bnb quantizer for them), which nobody here can produce or
check without its GPU import. Every layer of these models is the same MoE block, so per-layer cost
is what differs between systems; a cut model weighs the embeddings and the 152k/201k-entry head
more than the full one does, equally for all three. 8 layers: 11.2 GB (Qwen) and 15.5 GB (gpt-oss)
on disk. `--layers 0` runs the full depth where the disk allows (checked before writing). The
full-depth memory of velotune alone (the gpt-oss <= 13 GiB target) stays bench_moe.py's, built on
the GPU without a folder.

All three systems read the same folder (same weights, same routing), train the same tokens with
torch's fused AdamW (lr 1e-4), 2 warm-up steps (compiles and autotuning), then `--steps` timed ones:
- velotune: `load_model(DIR, load_in_4bit=True)` (NF4 attention linears and expert stacks as they
  stream in; embeddings, head and router bf16), LoRA r16 alpha 16 on q/k/v/o and per-expert
  adapters on the experts (fp32 adapters, as bench_moe.py), gradient checkpointing.
- unsloth: `FastModel.from_pretrained(DIR, max_seq_length, dtype=bf16, load_in_4bit=True)` (its
  zoo quantizes transformers 5's fused expert Parameters to NF4 too), `FastModel.get_peft_model(r=16,
  alpha=16, dropout 0, q/k/v/o/gate/up/down, use_gradient_checkpointing="unsloth")`: it maps
  gate/up/down onto the experts' `gate_up_proj`/`down_proj` Parameters (PEFT target_parameters);
  its MoE backend is its own default (torch._grouped_mm on an H100); bf16 autocast as its trainer.
- hf: `AutoModelForCausalLM.from_pretrained(DIR, BitsAndBytesConfig(nf4, double quant, bf16
  compute))` (attention NF4; experts stay bf16: stock transformers quantizes nn.Linear only),
  `prepare_model_for_kbit_training` (non-reentrant checkpointing; it upcasts the bf16 rest to fp32),
  PEFT LoRA r16 on q/k/v/o plus target_parameters on the experts, bf16 autocast as the HF Trainer.
The row's "expert GiB" is what each system stores the expert weights in (NF4 is about a quarter of
bf16), so a system that left its experts 16-bit shows it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE.parent / ".bench" / "tokenizer"      # SmolLM2's, from `bench_e2e.py prepare`
SYSTEMS = ("unsloth", "velotune", "hf")               # run in this order: Unsloth's row is the ratios' base
PEER_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache"}
PEER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
RECIPES = {
    "velotune": "NF4 attention + experts, LoRA r16 q/k/v/o + per-expert, checkpointing",
    "unsloth": "FastModel load_in_4bit, r16 q/k/v/o/gate/up/down, checkpointing 'unsloth'",
    "hf": "bnb NF4 (nn.Linear only), PEFT r16 q/k/v/o + target_parameters experts, checkpointing",
}
WARMUP = 2
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


def folder_for(cfg: dict, workdir: str | Path) -> Path:
    return Path(workdir) / f"{cfg['model_type']}-{cfg['num_hidden_layers']}L-h{cfg['hidden_size']}"


def bf16_bytes(cfg: dict) -> int:
    from velotune.models.config import ModelConfig

    return 2 * ModelConfig.from_hf_config(cfg, "moe_peer").num_parameters()


def hf_config(cfg: dict):
    import transformers

    kind = {"qwen3_moe": "Qwen3MoeConfig", "gpt_oss": "GptOssConfig"}[cfg["model_type"]]
    return getattr(transformers, kind)(**{k: v for k, v in cfg.items() if k != "model_type"})


def write_folder(cfg: dict, folder: Path, tokenizer: Path | None, device: str) -> Path:
    """Random bf16 weights (transformers' own initialisation, seed 0) saved as a Hugging Face folder,
    with `tokenizer`'s files beside them. A complete folder of the same config is kept (a warm
    machine's second call); the weights go to `folder`.partial first, renamed when whole."""
    import torch
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
                         "(give fewer --layers or another --workdir)")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.bfloat16)
    model.save_pretrained(partial)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, partial / f.name)
    partial.rename(folder)
    return folder


# ------------------------------------------------------------------ one system, in its own process
def load_velotune(folder: Path, seq: int, device: str):
    import torch

    import velotune
    from bench_moe import TARGETS, velotune_train_step
    from velotune.lora import LoraConfig, apply_lora

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = velotune.load_model(folder, dtype=dtype, device=device, load_in_4bit=True, max_seq_length=seq)
    model.gradient_checkpointing = True
    apply_lora(model, LoraConfig(r=16, alpha=16, target_modules=TARGETS), dtype=torch.float32)
    return model, velotune_train_step


def peer_step(model, optimizer, ids) -> float:
    """One step as the HF Trainer runs it with bf16=True: the forward under bf16 autocast."""
    import torch

    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def load_unsloth(folder: Path, seq: int, device: str):
    import torch
    from unsloth import FastModel

    model, _ = FastModel.from_pretrained(str(folder), max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True,
                                         full_finetuning=False)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=PEER_TARGETS,
                                     bias="none", use_gradient_checkpointing="unsloth", random_state=0)
    return model, peer_step


def load_hf(folder: Path, seq: int, device: str):
    import peft
    import torch
    import transformers

    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quant,
                                                              device_map={"": 0 if device == "cuda" else "cpu"})
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=PEER_TARGETS[:4],
                           target_parameters=EXPERT_PARAMETERS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora), peer_step


LOADERS = {"velotune": load_velotune, "unsloth": load_unsloth, "hf": load_hf}


def storage(model) -> dict:
    """GiB of the expert weights as stored (LoRA adapters aside), of all weights, and the trainable count."""
    expert = total = 0
    trainable = 0
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        size = t.numel() * t.element_size()
        total += size
        trainable += t.numel() if t.requires_grad else 0
        if ".experts" in name and "lora" not in name.lower():
            expert += size
    return {"expert_gib": expert / 2**30, "weights_gib": total / 2**30, "trainable": trainable}


def unsloth_backend() -> str | None:
    try:
        from unsloth_zoo.temporary_patches.moe_utils import select_moe_backend

        return select_moe_backend()
    except Exception:  # noqa: BLE001  (a note in the row, never a reason to fail the run)
        return None


def measure(system: str, folder: Path, seq: int, steps: int, device: str) -> dict:
    """Load, warm up, time `steps` steps; every failure (out of memory included) becomes `outcome`."""
    import torch

    result: dict = {"system": system, "seq": seq, "steps": steps}
    cuda = device == "cuda"
    try:
        started = time.perf_counter()
        model, step = LOADERS[system](folder, seq, device)
        model.train()
        result.update(load_s=time.perf_counter() - started, **storage(model))
        if system == "unsloth":
            result["note"] = f"MoE backend {unsloth_backend()}"
        elif system == "hf":
            result["note"] = f"experts {getattr(model.config, '_experts_implementation', None)}"
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
        for _ in range(WARMUP):
            step(model, optimizer, ids)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        losses = [step(model, optimizer, ids) for _ in range(steps)]
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        result.update(tokens_per_s=steps * seq / seconds, loss=losses[-1], outcome="ok",
                      peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
    except torch.OutOfMemoryError as exc:
        result["outcome"] = f"GPU OOM ({str(exc).splitlines()[0][:120]})"
    except Exception as exc:  # noqa: BLE001  (reported, not raised: the parent records the row)
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        result["outcome"] = f"{type(exc).__name__}: {first}"
    return result


# ------------------------------------------------------------------ the expert kernel of a peer
KERNEL_SECTION = ("MoE grouped experts, Qwen3-30B-A3B sizes (2,048 tokens x top-8 of 128 experts of 768, bf16, "
                  "fwd+bwd, frozen experts)")                  # bench_moe.py's table: the rows sit together


def peer_experts(system: str, hidden: int, inter: int, experts: int, w13, w2):
    """transformers 5's `Qwen3MoeExperts` holding `w13`/`w2` (frozen): with `system` "hf" its
    grouped_mm implementation (transformers' default on a GPU), with "unsloth" whatever forward
    `import unsloth` patched in (its MoE backend)."""
    import torch
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                      num_experts_per_tok=8)
    if system == "hf":
        cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        module = Qwen3MoeExperts(cfg)
    module.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return module


def kernel_step(system: str, device: str = "cuda", sizes: dict | None = None) -> dict:
    """Forward + backward (dx and routing-weight gradients) of a peer's expert module at bench_moe.py's
    kernel sizes, checked against velotune's kernel on the same inputs, timed with do_bench on a GPU."""
    import torch

    from bench_moe import bench_ms, kernel_inputs, velotune_kernel

    sizes = sizes or dict(tokens=2048, hidden=2048, inter=768, experts=128, k=8)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, ids, weights, w13, w2 = kernel_inputs(**sizes, device=device, dtype=dtype)
    result: dict = {"system": system}
    try:
        module = peer_experts(system, sizes["hidden"], sizes["inter"], sizes["experts"], w13, w2)
        forward = type(module).forward
        result["forward"] = f"{forward.__module__}.{forward.__qualname__}"
        if system == "unsloth":
            result["moe_backend"] = unsloth_backend()
        with torch.no_grad():
            want = velotune_kernel(x, ids, weights, w13, w2).float()
        got = module(x, ids, weights).detach().float()
        result["rel_diff"] = float((got - want).norm() / want.norm())
        dy = torch.randn_like(x)

        def step():
            torch.autograd.grad(module(x, ids, weights), (x, weights), dy)
        step()
        result.update(ms=bench_ms(step) if device == "cuda" else None, outcome="ok")
    except Exception as exc:  # noqa: BLE001  (reported: the parent writes the row)
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        result["outcome"] = f"{type(exc).__name__}: {first}"
    return result


def kernel_name(r: dict) -> str:
    name = {"unsloth": "Unsloth experts forward", "hf": "transformers 5 experts (grouped_mm)"}[r["system"]]
    if r.get("moe_backend"):
        name += f", backend {r['moe_backend']}"
    return name if r.get("outcome") == "ok" else f"{name}: {r.get('outcome')}"


# ------------------------------------------------------------------ the call: every system, rows
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
                     ratio(r.get("tokens_per_s"), base.get("tokens_per_s")) if ok else "n/a",
                     ratio(r.get("peak_gib"), base.get("peak_gib")) if ok else "n/a",
                     r.get("outcome", "?") + (f"; {r['note']}" if r.get("note") else "")])
    return rows


COLUMNS = ["date", "machine", "model", "system", "recipe", "tokens/s", "peak GiB", "expert GiB",
           "speed vs Unsloth", "memory vs Unsloth", "outcome"]


def run_system(system: str, folder: Path, seq: int, steps: int, device: str, timeout: float) -> dict:
    if timeout < 30:
        return {"system": system, "outcome": "skipped: the call's time budget ran out"}
    args = [sys.executable, str(Path(__file__).resolve()), "step", f"--system={system}", f"--model={folder}",
            f"--seq={seq}", f"--steps={steps}", f"--device={device}"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **PEER_ENV}, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"system": system, "outcome": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("MOE ")]
    if not lines:
        print(f"{system} printed no result (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"system": system, "outcome": f"exit {done.returncode}: {tail}"}
    result = json.loads(lines[-1][4:])
    if result.get("outcome") != "ok":
        print(f"{system}: {result['outcome']}\n{done.stderr[-3000:]}")
    return result


def run_kernels(systems: list[str], timeout: float, results: Path | None, where: str) -> None:
    from common import append_row, today

    for system in [s for s in ("unsloth", "hf") if s in systems]:
        args = [sys.executable, str(Path(__file__).resolve()), "kernel", f"--system={system}"]
        try:
            done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **PEER_ENV},
                                  timeout=max(timeout, 1))
            lines = [line for line in done.stdout.splitlines() if line.startswith("KERNEL ")]
            r = json.loads(lines[-1][7:]) if lines else {
                "system": system, "outcome": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or ['-'])[-1][:200]}"}
        except subprocess.TimeoutExpired:
            r = {"system": system, "outcome": f"timed out after {timeout:.0f} s"}
        ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
        print(f"  {kernel_name(r):60s} fwd+bwd {ms} ms  (rel. diff to velotune {r.get('rel_diff', float('nan')):.1e}; "
              f"forward {r.get('forward')})")
        append_row(KERNEL_SECTION, ["date", "machine", "implementation", "ms"], [today(), where, kernel_name(r), ms],
                   results)


def run(args: argparse.Namespace) -> None:
    import torch

    from common import append_row, machine, today

    deadline = time.monotonic() + args.budget_s
    tokenizer = None if args.tokenizer in ("", "none") else Path(args.tokenizer)
    if "unsloth" in args.systems and (tokenizer is None or not (tokenizer / "tokenizer.json").exists()):
        raise SystemExit(f"Unsloth loads a tokenizer with the model: {tokenizer} has no tokenizer.json "
                         "(run `python benchmarks/bench_e2e.py prepare` here and carry .bench)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moe_peer.py run: no CUDA GPU (give --device cpu for the velotune/hf smoke run)")
    where = machine()
    print(where)
    results_file = Path(args.results) if args.results else None
    if args.kernels:
        print("grouped experts, Qwen3-30B-A3B sizes, peers:")
        run_kernels(args.systems, min(120.0, deadline - time.monotonic()), results_file, where)
    table = models()
    for key in args.models:
        name, full = table[key]
        cfg = truncated(full, args.layers, args.tiny)
        folder = folder_for(cfg, args.workdir)
        started = time.perf_counter()
        write_folder(cfg, folder, tokenizer, args.device)
        print(f"{label(name, cfg, full)}: folder {folder} ({bf16_bytes(cfg) / 1e9:.1f} GB) "
              f"in {time.perf_counter() - started:.0f} s")
        results = {}
        for system in [s for s in SYSTEMS if s in args.systems]:
            results[system] = run_system(system, folder, args.seq, args.steps, args.device,
                                         deadline - time.monotonic())
            r = results[system]
            print(f"  {system:9s} {r.get('tokens_per_s', 0):8.0f} tokens/s  peak {r.get('peak_gib', 0):6.2f} GiB  "
                  f"experts {r.get('expert_gib', 0):6.2f} GiB  load {r.get('load_s', 0):5.0f} s  {r['outcome']}")
        section = (f"MoE QLoRA training vs Unsloth, same call (micro-batch 1 x {args.seq}, random weights, "
                   f"{args.steps} timed steps after {WARMUP} warm-up)")
        for row in format_rows(results, label(name, cfg, full), today(), where):
            append_row(section, COLUMNS, row, results_file)
        if "velotune" in results and "unsloth" in results:
            print(f"  velotune vs Unsloth: speed {ratio(results['velotune'].get('tokens_per_s'), results['unsloth'].get('tokens_per_s'))}, "
                  f"memory {ratio(results['velotune'].get('peak_gib'), results['unsloth'].get('peak_gib'))}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for command in ("run", "write"):
        c = sub.add_parser(command)
        c.add_argument("--models", nargs="+", choices=("qwen", "gptoss"), default=["qwen", "gptoss"])
        c.add_argument("--layers", type=int, default=8, help="decoder layers kept of each model (0: all)")
        c.add_argument("--workdir", default="/tmp/velotune-moe", help="where the random folders are written")
        c.add_argument("--tokenizer", default=str(TOKENIZER), help="tokenizer files copied into each folder ('none')")
        c.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        c.add_argument("--tiny", action="store_true", help="toy widths (the CPU smoke run), same structure")
    c = sub.choices["run"]
    c.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    c.add_argument("--seq", type=int, default=2048)
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--budget-s", type=float, default=540, help="systems not started by then are skipped")
    c.add_argument("--results", default=None, help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    c.add_argument("--kernels", action="store_true",
                   help="first the peers' expert kernels beside bench_moe.py's rows (Unsloth's, transformers' grouped_mm)")
    s = sub.add_parser("step")
    s.add_argument("--system", choices=SYSTEMS, required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--seq", type=int, default=2048)
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    k = sub.add_parser("kernel")
    k.add_argument("--system", choices=("unsloth", "hf"), required=True)
    args = p.parse_args(argv)
    if args.command == "kernel":
        if args.system == "unsloth":
            import unsloth  # noqa: F401  (before transformers: its import patches the experts' forward)
        print("KERNEL " + json.dumps(kernel_step(args.system)), flush=True)
    elif args.command == "step":
        if args.system == "unsloth":
            import unsloth  # noqa: F401  (before transformers, as it requires)
        print("MOE " + json.dumps(measure(args.system, Path(args.model), args.seq, args.steps, args.device)),
              flush=True)
    elif args.command == "write":
        for key in args.models:
            name, full = models()[key]
            cfg = truncated(full, args.layers, args.tiny)
            tok = None if args.tokenizer in ("", "none") else Path(args.tokenizer)
            folder = write_folder(cfg, folder_for(cfg, args.workdir),
                                  tok if tok is not None and tok.exists() else None, args.device)
            print(f"{label(name, cfg, full)}: {folder}")
    else:
        run(args)


if __name__ == "__main__":
    main()
