"""LoRA / QLoRA training throughput and memory: velotune vs transformers + PEFT, same loop.

Both systems run, in this one process, the same plain loop on the same random-weight model
(a real architecture config: Llama-3.1-8B or Llama-3.2-1B) and the same random tokens:
forward, backward, AdamW step. transformers uses sdpa attention and gradient checkpointing;
velotune uses its defaults (kernels on, checkpointing on). Each row in RESULTS.md gives
tokens/s, ms/step, peak allocated and reserved memory, MFU against the bf16 matmul rate measured
in the same run, and velotune's ratios to transformers.

    python benchmarks/bench_train.py --model Llama-3.1-8B --batch 1 4 --seq 2048 [--qlora]
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from common import append_row, bf16_matmul_tflops, machine, require_cuda, today, train_flops_per_token

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(name: str) -> dict:
    from velotune.models.known_configs import known_config

    found = known_config(name)
    if found is None:
        raise SystemExit(f"unknown model {name!r}; see velotune/models/known_configs.py")
    return dict(found[1]["config"])


def velotune_system(cfg: dict, qlora: bool):
    from velotune.lora import LoraConfig, apply_lora
    from velotune.models.config import ModelConfig
    from velotune.models.transformer import Transformer

    config = ModelConfig.from_hf_config(cfg, "bench")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no float32 copy of 8B weights
    try:
        with torch.device("cuda"):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    if qlora:
        from velotune.quant import quantize_linears

        quantize_linears(model, TARGETS)
    model.gradient_checkpointing = True
    # float32 adapters over the bf16 base, as PEFT does by default (autocast_adapter_dtype)
    apply_lora(model, LoraConfig(r=16, alpha=16, dropout=0.0, target_modules=TARGETS), dtype=torch.float32)

    def step(ids):
        out = model(ids, labels=ids, return_logits=False)
        (out.loss_sum / out.num_targets).backward()

    return model, step, config


def transformers_system(cfg: dict, qlora: bool):
    import peft
    import transformers

    rest = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **rest)
    kwargs = dict(attn_implementation="sdpa", dtype=torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    if qlora:
        raise SystemExit("the transformers QLoRA reference needs bitsandbytes and a saved checkpoint: not wired yet")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()

    return model, step


def measure(build, batch: int, seq: int, vocab: int, steps: int) -> dict:
    torch.cuda.empty_cache()
    built = build()
    model, step = built[0], built[1]
    torch.cuda.reset_peak_memory_stats()  # the loop's peak, not the one-off construction's
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), device="cuda", generator=g) for _ in range(steps + 2)]
    try:
        for i, ids in enumerate(batches):
            if i == 2:  # two warm-up steps (compilation, autotuning, allocator growth)
                torch.cuda.synchronize()
                start = time.perf_counter()
            step(ids)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        return dict(ms=seconds * 1e3, tok_s=batch * seq / seconds,
                    alloc=torch.cuda.max_memory_allocated() / 2**30,
                    reserved=torch.cuda.max_memory_reserved() / 2**30)
    except torch.OutOfMemoryError:
        return dict(ms=float("nan"), tok_s=0.0, alloc=float("nan"), reserved=float("nan"), oom=True)
    finally:
        del model, opt, built
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    require_cuda()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--qlora", action="store_true")
    args = p.parse_args()
    cfg = hf_config(args.model)
    peak = bf16_matmul_tflops()
    from velotune.models.config import ModelConfig

    flops_tok = train_flops_per_token(ModelConfig.from_hf_config(cfg, args.model), args.seq)
    method = "QLoRA" if args.qlora else "LoRA"
    cols = ["date", "machine", "config", "system", "tokens/s", "ms/step", "peak alloc GiB",
            "peak reserved GiB", "MFU", "speed ratio", "memory ratio"]
    for batch in args.batch:
        ref = measure(lambda: transformers_system(cfg, args.qlora), batch, args.seq, cfg["vocab_size"], args.steps)
        ours = measure(lambda: velotune_system(cfg, args.qlora), batch, args.seq, cfg["vocab_size"], args.steps)
        config = f"{args.model} {method} r16 seq {args.seq} micro-batch {batch} ckpt on, bf16 matmul {peak:.0f} TFLOP/s"
        for name, r in (("transformers+PEFT", ref), ("velotune", ours)):
            mfu = r["tok_s"] * flops_tok / (peak * 1e12)
            ratio = (f"{ours['tok_s'] / ref['tok_s']:.2f}x" if ref["tok_s"] else "ref OOM") if name == "velotune" else "1.00x"
            mem = f"{ours['alloc'] / ref['alloc']:.2f}x" if name == "velotune" and ref["tok_s"] else "1.00x"
            row = [today(), machine(), config, name, f"{r['tok_s']:,.0f}", f"{r['ms']:.0f}", f"{r['alloc']:.1f}",
                   f"{r['reserved']:.1f}", f"{mfu:.1%}", ratio, mem]
            append_row(f"Training throughput ({method})", cols, row)
            print(" | ".join(row[2:]))


if __name__ == "__main__":
    main()
