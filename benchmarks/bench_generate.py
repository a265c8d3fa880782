"""Batched decode throughput: velotune's generation engine vs transformers' `generate`.

Both decode greedily, in this one process, from the same random-weight model (velotune loads the
weights transformers created, so both run the same numbers), batch B of random prompts of P
tokens, N new tokens each with no stop token. Appends one row per system to RESULTS.md.

    python benchmarks/bench_generate.py --model Llama-3.2-1B --batch 64 --prompt 128 --new 128
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import append_row, machine, require_cuda, today


def timed(fn) -> float:
    fn()  # warm-up (allocations, kernel selection)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    require_cuda()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3.2-1B")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    args = p.parse_args()
    import transformers

    import velotune
    from velotune.infer.engine import generate_tensor
    from velotune.infer.sampling import SamplingParams
    from velotune.models.known_configs import known_config

    cfg = dict(known_config(args.model)[1]["config"])
    hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).cuda().eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours, _ = velotune.load_model(tmp, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, hf_config.vocab_size, (args.batch, args.prompt), device="cuda")
    mask = torch.ones_like(ids)
    params = SamplingParams(max_new_tokens=args.new, stop_token_ids=[])
    t_ref = timed(lambda: ref.generate(ids, attention_mask=mask, max_new_tokens=args.new,
                                       min_new_tokens=args.new, do_sample=False))
    t_ours = timed(lambda: generate_tensor(ours, ids, params, attention_mask=mask, stop_token_ids=[]))
    same = torch.equal(
        ref.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=16, min_new_tokens=16, do_sample=False),
        generate_tensor(ours, ids[:2], SamplingParams(max_new_tokens=16), attention_mask=mask[:2], stop_token_ids=[]))
    tokens = args.batch * args.new
    config = f"{args.model} bf16 greedy, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens"
    cols = ["date", "machine", "config", "system", "generated tokens/s", "s per batch", "ratio", "same greedy ids (2 x 16)"]
    for name, t in (("transformers generate", t_ref), ("velotune engine", t_ours)):
        row = [today(), machine(), config, name, f"{tokens / t:,.0f}", f"{t:.2f}", f"{t_ref / t:.2f}x", str(same)]
        append_row("Batched decode throughput", cols, row)
        print(" | ".join(row[2:]), flush=True)


if __name__ == "__main__":
    main()
