"""One system in bench_train.py's plain training loop, in its own process, for `bench_train.py
--vs-unsloth`: Unsloth (whose import patches transformers and torch, so it must come first and
alone) or velotune. Prints one line `LOOP {json}`: tokens/s, ms/step, peak allocated GiB, the
optimizer and set-up it ran, and `outcome` ("ok", or the error that ended it, out of memory included).

    python benchmarks/loop_peer.py --system unsloth --model DIR --batch 4 --seq 2048 [--qlora] [--steps 5]

Both systems read the same random-weight folder (bench_train.py writes it) and run bench_train's
`measure`: the same random tokens from the host, forward with labels, backward, optimizer step,
3 warm-up steps then `--steps` timed, peak `torch.cuda.max_memory_allocated` over the loop; no
autocast on either side (bf16 weights, as a user's own loop calls the model).
- unsloth, with its recommended settings: `FastLanguageModel.from_pretrained(DIR, max_seq_length,
  dtype=bf16, load_in_4bit=qlora)`, `get_peft_model(r=16, lora_alpha=16, dropout 0, the seven
  projections, bias "none", use_gradient_checkpointing="unsloth")`, `FastLanguageModel.for_training`,
  and its notebooks' optimizer `adamw_8bit`: bitsandbytes' AdamW with 8-bit states.
- velotune, as its trainer sets a model up by default, in the loop a user writes around the model:
  `load_model(DIR, load_in_4bit=qlora)` (bf16), float32 adapters r16 alpha 16 on the seven
  projections, `offload_embeddings: auto`, checkpointing on (`--checkpointing`) with
  `offload_checkpoints: auto` (`--offload`: on) through the trainer's `configure_training_memory`,
  its default optimizer `adamw` (torch's fused AdamW), and the model's own default
  `cuda_graphs` (models/loop_graphs.py: a repeated shape below the GPU-bound size replays captured
  graphs; the setup column says how many steps did). `--eager` turns those graphs off.

Assumptions about Unsloth 2026.10.9 (read from its wheel and unsloth_zoo's; it imports only with a
GPU, so this side has not run where it was written):
- `from_pretrained` opens a local folder offline (HF_HUB_OFFLINE=1, as bench_e2e's peer runs it)
  with SmolLM2's tokenizer beside the weights; its `load_in_4bit` defaults to True, so LoRA passes False.
- `get_peft_model` puts its fused LoRA kernels on the layers; they cast the adapters to the
  activations' dtype (kernels/utils.py `matmul_lora`), so the bf16 model trains without autocast,
  as in bench_train's loop; `model(input_ids, labels).loss` is its fused cross-entropy.
- "adamw_8bit" in the HF Trainer is `bitsandbytes.optim.AdamW(optim_bits=8, is_paged=False)`
  (transformers' trainer_optimizer.py); the same here, lr 1e-4 as every system in bench_train.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from peer_report import emit, failure

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPTIMIZERS = {"unsloth": "bitsandbytes AdamW 8-bit (adamw_8bit)", "velotune": "torch AdamW, fused (adamw)"}


def adamw_8bit(params: list):
    import bitsandbytes

    return bitsandbytes.optim.AdamW(params, lr=1e-4, optim_bits=8, is_paged=False)


def load_unsloth(folder: Path, args: argparse.Namespace, result: dict):
    import bitsandbytes
    import peft
    import torch
    import unsloth
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=args.qlora)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=0)
    FastLanguageModel.for_training(model)      # training mode, keeping the checkpointing get_peft_model chose
    result.update(version=f"Unsloth {unsloth.__version__} (peft {peft.__version__}, bitsandbytes "
                          f"{bitsandbytes.__version__})", setup="FastLanguageModel bf16" + (
        " load_in_4bit" if args.qlora else "") + ", LoRA r16 alpha 16, checkpointing 'unsloth'")

    def step(ids):
        ids = ids.to(args.device, non_blocking=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return model, step


def load_velotune(folder: Path, args: argparse.Namespace, result: dict):
    import velotune
    from bench_train import velotune_system
    from velotune.models.checkpointing import configure_training_memory
    from velotune.models.host_embedding import on_host

    model, step, _ = velotune_system(None, args.qlora, folder, graphs=False, device=args.device,
                                     host_embeddings=not args.no_offload_embeddings, loop_graphs=not args.eager)
    checkpointing = {"on": True, "off": False, "auto": "auto"}[args.checkpointing]
    configure_training_memory(model, checkpointing=checkpointing, offload=True if args.offload else "auto",
                              batch=args.batch, seq=args.seq)   # after the adapters and embeddings, as the trainer
    base = "NF4" if args.qlora else str(model.lm_head.weight.dtype).removeprefix("torch.")
    result["graphs"] = model.loop_graphs.describe   # read after the loop: how many steps replayed
    result.update(version=f"velotune {velotune.__version__}", setup=(
        f"{'eager (cuda_graphs off)' if args.eager else 'own loop, cuda_graphs default'}, {base} base, "
        f"float32 adapters r16 alpha 16, "
        f"checkpointing {args.checkpointing}, offload_checkpoints {'true' if args.offload else 'auto'}: "
        f"{offload_words(model)}, input embeddings in "
        f"{'host memory' if on_host(model) else 'device memory'}"))
    return model, step


def offload_words(model) -> str:
    """How `offload_checkpoints` came out for this run's micro-batch: off, on, or on from N tokens."""
    if not model.offload_checkpoints:
        return "off"
    least = model.offload_min_tokens
    return f"on from {least:,} tokens a micro-batch" if least else "on"


def measure_system(folder: Path, args: argparse.Namespace) -> dict:
    """`args.system` in bench_train's loop; every failure (out of memory included) becomes `outcome`."""
    result: dict = {"system": args.system, "optimizer": OPTIMIZERS[args.system]}
    try:
        if args.system == "unsloth":
            import unsloth  # noqa: F401  (before transformers and before bench_train's torch, as it requires)
        from bench_train import fused_adamw, measure

        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        load, optimizer = {"unsloth": (load_unsloth, adamw_8bit), "velotune": (load_velotune, fused_adamw)}[args.system]
        found = measure(lambda: load(folder, args, result), args.batch, args.seq, vocab, args.steps, optimizer,
                        args.device)
        if found.pop("oom", False):
            result["outcome"] = "GPU OOM in the loop"
        else:
            result.update(found, outcome="ok")
    except Exception as exc:  # noqa: BLE001  (reported, not raised: the parent records the row; an OOM
        result["outcome"] = failure(exc)   # here is the load's, measure catches the loop's)
    graphs = result.pop("graphs", None)
    if graphs is not None:
        result["setup"] += f" ({graphs()})"
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=tuple(OPTIMIZERS), required=True)
    p.add_argument("--model", type=Path, required=True, help="the random-weight Hugging Face folder")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the smoke run (velotune)")
    p.add_argument("--checkpointing", choices=("on", "off", "auto"), default="on", help="velotune's")
    p.add_argument("--offload", action="store_true", help="velotune: offload_checkpoints true (default auto)")
    p.add_argument("--no-offload-embeddings", action="store_true", help="velotune: offload_embeddings false")
    p.add_argument("--eager", action="store_true", help="velotune: model.cuda_graphs off (every step eager)")
    return p.parse_args(argv)


def main() -> None:
    args = parse()
    emit("LOOP", measure_system(args.model, args))


if __name__ == "__main__":
    main()
