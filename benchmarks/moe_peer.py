"""One system's mixture-of-experts QLoRA steps, or its expert kernel, in its own process, for
bench_moe_peers.py (Unsloth patches transformers when imported, so it must come first and alone):

    python benchmarks/moe_peer.py step --system unsloth --model DIR [--seq 2048 --steps 4]  # MOE {json}
    python benchmarks/moe_peer.py kernel --system unsloth                                 # KERNEL {json}

All three systems read the same folder (same weights, so the same routing), train on the same
tokens with torch's fused AdamW (lr 1e-4), 2 warm-up steps (compiles, autotuning), then `--steps`:
- velotune: `load_model(DIR, load_in_4bit=True)` (NF4 attention linears and expert stacks as they
  stream in; embeddings, head and router bf16), LoRA r16 alpha 16 on q/k/v/o and per-expert
  adapters on the experts (fp32 adapters, as bench_moe.py), gradient checkpointing.
- unsloth: `FastModel.from_pretrained(DIR, max_seq_length, dtype=bf16, load_in_4bit=True)` (its
  zoo quantizes transformers 5's fused expert Parameters to NF4 as well), `FastModel.get_peft_model(
  r=16, alpha=16, dropout 0, q/k/v/o/gate/up/down, use_gradient_checkpointing="unsloth")`, which maps
  gate/up/down onto the experts' `gate_up_proj`/`down_proj` Parameters (PEFT target_parameters);
  its default MoE backend (named in the row); bf16 autocast, as its trainer sets for LoRA.
- hf: `AutoModelForCausalLM.from_pretrained(DIR, BitsAndBytesConfig(nf4, double quant, bf16
  compute))` (attention NF4; the experts stay 16-bit: stock transformers quantizes nn.Linear only),
  `prepare_model_for_kbit_training` (non-reentrant checkpointing; it upcasts the rest to fp32),
  PEFT LoRA r16 on q/k/v/o plus target_parameters on the experts, bf16 autocast as the HF Trainer.
The row's "expert GiB" is what each system stores the expert weights in (NF4 about a quarter of
bf16), so a system that left its experts 16-bit shows it. Both peers' adapters are velotune's in
number (the CPU test checks the trainable counts are equal).

`kernel`: transformers 5's `Qwen3MoeExperts` at bench_moe.py's kernel sizes holding the same
weights: after `import unsloth` its forward is whatever Unsloth patched in (its MoE backend); for
`hf` it is transformers' grouped_mm implementation (its default on a GPU). Checked against
velotune's kernel on the same inputs, then forward + backward timed with do_bench.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from peer_report import emit, failure

PEER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
WARMUP = 2


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
    FastModel.for_training(model)      # training mode, keeping the checkpointing get_peft_model chose
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
    except Exception as exc:  # noqa: BLE001  (reported, not raised: the parent records the row)
        result["outcome"] = failure(exc)
    return result


# ------------------------------------------------------------------ the expert kernel of a peer
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
        result["outcome"] = failure(exc)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step")
    s.add_argument("--system", choices=tuple(LOADERS), required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--seq", type=int, default=2048)
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    k = sub.add_parser("kernel")
    k.add_argument("--system", choices=("unsloth", "hf"), required=True)
    args = p.parse_args(argv)
    if args.system == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as it requires; its import patches the experts)
    if args.command == "kernel":
        emit("KERNEL", kernel_step(args.system))
    emit("MOE", measure(args.system, Path(args.model), args.seq, args.steps, args.device))


if __name__ == "__main__":
    main()
