"""Mixture-of-experts benchmarks on one GPU (issue 20), each appending a row to RESULTS.md:

  kernel  the grouped-expert MLP forward + backward at Qwen3-30B-A3B sizes (2,048 tokens,
          hidden 2,048, 128 experts of 768, top-8, bf16, frozen experts: dx and routing-weight
          gradients) against `torch._grouped_mm` (sort, grouped GEMMs, GLU, weighted combine, autograd)
          and transformers' per-expert loop (`--system hf`: that loop only)
  qwen    Qwen3-30B-A3B architecture, random weights built on the GPU (no disk), QLoRA r16 on
          attention and experts (NF4 experts and attention, bf16 router/embeddings), micro-batch 1 x
          2,048 tokens, checkpointing on: tokens/s and peak memory
  gptoss  gpt-oss-20b architecture, same recipe, micro-batch 1 x 2,048: peak memory (target <= 13 GiB)

    python benchmarks/bench_moe.py                      # all three, about 3-4 minutes on an H100
    python benchmarks/bench_moe.py --parts kernel --system hf

`--system velotune|hf` picks whose path runs; `velotune_train_step(config, ...)` and
`velotune_kernel(...)` are plain functions so another system's process can be timed beside them
with the same shapes: bench_moe_peers.py does so for Unsloth and transformers (their expert
modules, and QLoRA training on a layer-cut folder all three load). `--system hf` for the model parts runs transformers + PEFT LoRA
r16 in bf16 (QLoRA through bitsandbytes needs a saved checkpoint, which this script avoids).
"""
from __future__ import annotations

import argparse
import time

import torch
from common import append_row, machine, require_cuda, today

QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                     rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     tie_word_embeddings=False)
GPT_OSS_20B = dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                   num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                   num_local_experts=32, num_experts_per_tok=4, sliding_window=128, attention_bias=True,
                   rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                        beta_slow=1.0, original_max_position_embeddings=4096, truncate=False),
                   max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]


def bench_ms(fn, reps: int = 20) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=reps * 20, return_mode="median")


# ------------------------------------------------------------------ (a) the kernel
def kernel_inputs(tokens=2048, hidden=2048, inter=768, experts=128, k=8, seed=0, device="cuda", dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
    logits = torch.randn(tokens, experts, device=device, generator=g)
    top, ids = torch.topk(torch.softmax(logits, -1), k)
    weights = (top / top.sum(-1, keepdim=True)).to(dtype).requires_grad_()
    w13 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype, generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype, generator=g) * inter ** -0.5
    return x, ids, weights, w13, w2


def velotune_kernel(x, ids, weights, w13, w2):
    from velotune.kernels import moe_experts
    from velotune.kernels.moe_reference import Experts

    return moe_experts(x, ids, weights, Experts(w13, w2))


def grouped_mm_kernel(x, ids, weights, w13, w2):
    """The same computation through torch._grouped_mm (offsets of each expert's sorted rows)."""
    n, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=w13.shape[0]), 0).to(torch.int32)
    rows = x[order // k]
    gu = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs)
    g, u = gu.chunk(2, dim=-1)
    o = torch._grouped_mm(torch.nn.functional.silu(g) * u, w2.transpose(1, 2), offs=offs)
    o = o * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, order // k, o)


def loop_kernel(x, ids, weights, w13, w2):
    """transformers' per-expert loop (Qwen3MoeExperts.forward), for `--system hf`."""
    from velotune.kernels.moe_reference import moe_experts_reference, Experts

    return moe_experts_reference(x, ids, weights, Experts(w13, w2))


def run_kernel(system: str) -> list[tuple[str, float]]:
    x, ids, weights, w13, w2 = kernel_inputs()
    dy = torch.randn_like(x)
    impls = {"velotune": [("velotune grouped Triton", velotune_kernel), ("torch._grouped_mm", grouped_mm_kernel)],
             "hf": [("transformers per-expert loop", loop_kernel)]}[system]
    results = []
    want = velotune_kernel(x, ids, weights, w13, w2).float()
    for name, fn in impls:
        got = fn(x, ids, weights, w13, w2).float()
        err = float((got - want).norm() / want.norm())

        def step():
            y = fn(x, ids, weights, w13, w2)
            torch.autograd.grad(y, (x, weights), dy)
        ms = bench_ms(step)
        results.append((name, ms))
        print(f"  {name:32s} fwd+bwd {ms:8.3f} ms   (rel. diff to velotune {err:.1e})")
        append_row("MoE grouped experts, Qwen3-30B-A3B sizes (2,048 tokens x top-8 of 128 experts of 768, bf16, "
                   "fwd+bwd, frozen experts)", ["date", "machine", "implementation", "ms"],
                   [today(), machine(), name, f"{ms:.3f}"])
    return results


# ------------------------------------------------------------------ (b, c) whole models
def build_velotune(cfg: dict, device: str = "cuda"):
    """Random-weight QLoRA model built on the GPU: bf16 weights allocated there, initialised in
    place, then attention linears and experts quantized to NF4 layer by layer; LoRA r16."""
    from velotune.lora import LoraConfig, apply_lora
    from velotune.models.config import ModelConfig
    from velotune.models.transformer import Transformer
    from velotune.quant.experts4bit import quantize_experts
    from velotune.quant.model import quantize_linears

    config = ModelConfig.from_hf_config(cfg, "bench")
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02) if "norm" not in name else p.fill_(1.0)
    quantize_linears(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    quantize_experts(model)
    torch.cuda.empty_cache()
    model.gradient_checkpointing = True
    apply_lora(model, LoraConfig(r=16, alpha=16, target_modules=TARGETS), dtype=torch.float32)
    return model


def velotune_train_step(model, optimizer, ids: torch.Tensor) -> float:
    out = model(ids, labels=ids, return_logits=False)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss)


def build_hf(cfg: dict):
    import peft
    import transformers

    kind = {"qwen3_moe": "Qwen3MoeConfig", "gpt_oss": "GptOssConfig"}[cfg["model_type"]]
    fields = {k: v for k, v in cfg.items() if k != "model_type"}
    hf_config = getattr(transformers, kind)(**fields)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS[:4]))


def hf_train_step(model, optimizer, ids: torch.Tensor) -> float:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss)


def run_model(name: str, cfg: dict, system: str, seq: int, steps: int) -> dict:
    build, step = (build_velotune, velotune_train_step) if system == "velotune" else (build_hf, hf_train_step)
    torch.cuda.empty_cache()
    model = build(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg["vocab_size"], (1, seq), device="cuda")
    step(model, optimizer, ids)                                  # warm-up (compiles the kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step(model, optimizer, ids) for _ in range(steps)]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = dict(tokens_per_s=steps * seq / seconds, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               loss=losses[-1])
    label = "QLoRA r16 (NF4 attention + experts)" if system == "velotune" else "LoRA r16 bf16 (transformers + PEFT)"
    print(f"  {name:14s} {system:8s} {row['tokens_per_s']:9.0f} tokens/s  peak {row['peak_gib']:6.2f} GiB  "
          f"loss {row['loss']:.3f}")
    append_row(f"MoE training, micro-batch 1 x {seq}, random weights", ["date", "machine", "model", "system", "method",
                                                                        "tokens/s", "peak GiB"],
               [today(), machine(), name, system, label, f"{row['tokens_per_s']:.0f}", f"{row['peak_gib']:.2f}"])
    del model, optimizer
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("kernel", "qwen", "gptoss"), default=["kernel", "qwen", "gptoss"])
    p.add_argument("--system", choices=("velotune", "hf"), default="velotune")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    require_cuda()
    print(machine())
    if "kernel" in args.parts:
        print("grouped experts, Qwen3-30B-A3B sizes:")
        run_kernel(args.system)
    if "qwen" in args.parts:
        run_model("Qwen3-30B-A3B", QWEN3_30B_A3B, args.system, args.seq, args.steps)
    if "gptoss" in args.parts:
        run_model("gpt-oss-20b", GPT_OSS_20B, args.system, args.seq, args.steps)


if __name__ == "__main__":
    main()
